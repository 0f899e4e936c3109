#!/usr/bin/env bash
# Pretrain one model on several Macs at once: data parallel over mx.distributed, started by mlx.launch.
# Every rank reads its own share of the row groups, gradients are averaged before each step, rank 0
# logs and writes the model; every rank writes its own optimizer + loader state (exact resume).
#
#   bash runs/multi_mac.sh --hosts 192.168.1.10,192.168.1.11 -- --depth 12 --device-batch-size 16
#   bash runs/multi_mac.sh --hostfile hosts.json -- --depth 20 --save-every 500
#   bash runs/multi_mac.sh --hostfile mesh.json --backend jaccl -- --depth 20   # Thunderbolt 5 RDMA
#   bash runs/multi_mac.sh --local 2 -- --depth 4 --max-seq-len 256 --head-dim 64 --window-pattern L \
#       --device-batch-size 4 --total-batch-size 4096 --num-iterations 50 --data-dir demo   # one machine
#   bash runs/multi_mac.sh --hosts 192.168.1.10,192.168.1.11 --check           # test the link only
#
#   bash runs/multi_mac.sh --hosts 192.168.1.10,192.168.1.11 --script chat_sft -- --model-tag d12  # SFT
#
# Options (everything after -- goes to the training script):
#   --script NAME      base_train (default) or chat_sft
#   --hosts IP,IP,...  one IP address per Mac, rank 0 first (IPs, not hostnames: see README)
#   --hostfile FILE    mlx.launch JSON hostfile: [{"ssh": "mac-a.local", "ips": ["10.0.0.1"]}, ...]
#   --local N          N processes on this machine (127.0.0.1): try the setup on one Mac or Linux box
#   --backend NAME     ring (default: TCP over Ethernet / Thunderbolt IPs) | jaccl (RDMA over
#                      Thunderbolt 5, macOS >= 26.2, fully connected mesh) | mpi
#   --check            only run a connectivity + bandwidth test across the ranks, then exit
#   --dry-run          print the mlx.launch command and exit
#   -h, --help         this text
# Environment: MLXCHAT_BASE_DIR (passed to every rank), PYTHON (default .venv/bin/python, the same
# path on every Mac), MLXCHAT_DIST_TIMEOUT (seconds before a stuck rank ends the run, default 120).
# Before the first run, on EVERY Mac: this checkout at the same path, `bash runs/setup.sh`, the data
# (`python -m mlxchat.dataset -n N`) and the same tokenizer (copy <base>/tokenizer from rank 0's Mac).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

HOSTS=""; HOSTFILE=""; LOCAL=""; BACKEND=""; CHECK=0; DRY=0; SCRIPT=base_train
while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS="$2"; shift 2 ;;
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --local) LOCAL="$2"; shift 2 ;;
    --backend) BACKEND="$2"; shift 2 ;;
    --script) SCRIPT="$2"; shift 2
      case "$SCRIPT" in base_train|chat_sft) ;; *) echo "--script must be base_train or chat_sft" >&2; exit 2 ;; esac ;;
    --check) CHECK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help; training flags go after --)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
case "$PYTHON" in /*) ;; *) PYTHON="$ROOT/$PYTHON" ;; esac
LAUNCH="$(dirname "$PYTHON")/mlx.launch"
if [ ! -x "$LAUNCH" ] && [ "$DRY" = 0 ]; then
  echo "no mlx.launch next to $PYTHON: run 'bash runs/setup.sh' first (or set PYTHON)" >&2; exit 1
fi

# where the ranks run
WHERE=()
n_set=0
[ -n "$HOSTS" ] && { WHERE=(--hosts "$HOSTS"); n_set=$((n_set + 1)); }
[ -n "$HOSTFILE" ] && { WHERE=(--hostfile "$HOSTFILE"); n_set=$((n_set + 1)); }
[ -n "$LOCAL" ] && { WHERE=(--hosts 127.0.0.1 -n "$LOCAL"); n_set=$((n_set + 1)); }
if [ "$n_set" != 1 ]; then
  echo "give exactly one of --hosts, --hostfile, --local (see --help)" >&2; exit 2
fi
if [ -n "$HOSTS" ]; then
  # the ring backend needs IP addresses; hostnames also make the link 10x+ slower (mlx issue 1210)
  for h in ${HOSTS//,/ }; do
    if ! [[ "$h" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$h" == *:* ]]; then
      echo "--hosts wants IP addresses, got '$h': look it up with 'ipconfig getifaddr en0' (Ethernet/Wi-Fi)" \
           "or the Thunderbolt bridge's address on that Mac" >&2; exit 2
    fi
  done
fi
[ -z "$BACKEND" ] && [ -z "$HOSTFILE" ] && BACKEND=ring
BACKEND_ARGS=(); [ -n "$BACKEND" ] && BACKEND_ARGS=(--backend "$BACKEND")

ENVS=(--env "MLXCHAT_BASE_DIR=${MLXCHAT_BASE_DIR:-$HOME/.cache/mlxchat}" --env "PYTHONUNBUFFERED=1")
# faster GPU <-> CPU synchronization: the collectives run on the CPU (MLX's distributed docs)
[ "$(uname -s)" = "Darwin" ] && ENVS+=(--env "MLX_METAL_FAST_SYNCH=1")
TIMEOUT="${MLXCHAT_DIST_TIMEOUT:-120}"

if [ "$CHECK" = 1 ]; then
  CMD=("$PYTHON" -c '
import sys, time
import mlxchat  # noqa: F401
import mlx.core as mx
from mlxchat.common import print0
from mlxchat.distributed import all_reduce_mean, compute_init
rank, world, group = compute_init(sys.argv[1], float(sys.argv[2]))
print(f"rank {rank} of {world}: joined", flush=True)
x = {"grads": mx.full((16 << 20,), float(rank + 1))}  # 64 MiB of fp32
all_reduce_mean(x)  # warm up
t0 = time.perf_counter()
for _ in range(3):
    y = all_reduce_mean(x)
dt = (time.perf_counter() - t0) / 3
expect = (world + 1) / 2
assert abs(y["grads"][0].item() - expect) < 1e-6, (y["grads"][0].item(), expect)
print0(f"all-reduce of 64 MiB over {world} ranks: {dt * 1000:.1f} ms ({64 / 1024 / dt:.2f} GiB/s per rank); link OK")
' "${BACKEND:-any}" "$TIMEOUT")
else
  CMD=("$PYTHON" -m "scripts.$SCRIPT" --dist-backend "${BACKEND:-any}" --dist-timeout "$TIMEOUT" "$@")
fi

FULL=("$LAUNCH" "${WHERE[@]}" "${BACKEND_ARGS[@]}" --cwd "$ROOT" "${ENVS[@]}" -- "${CMD[@]}")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${FULL[@]}"; echo; exit 0
fi
# mlx.launch exits 0 even when a rank fails (it prints "[WARN] Node with rank r exited with code c"
# and stops the others): keep its stderr to give this script an honest exit status for chaining
ERRLOG="$(mktemp)"; trap 'rm -f "$ERRLOG"' EXIT
set +e
"${FULL[@]}" 2> >(tee "$ERRLOG" >&2)
STATUS=$?
set -e
wait  # for tee
if [ "$STATUS" = 0 ] && grep -qE "Node with rank [0-9]+ (exited with code|was killed)" "$ERRLOG"; then
  echo "[multi_mac] a rank failed (see above). If training had started, the same command plus" \
       "--resume-from-step -2 continues from the last checkpoint." >&2
  STATUS=1
fi
exit "$STATUS"
