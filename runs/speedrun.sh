#!/usr/bin/env bash
# The full mlxchat pipeline on real data, for a Mac (nanochat's runs/speedrun.sh, sized for one machine):
#   download ClimbMix shards -> tokenizer -> pretraining -> base eval -> SFT -> (RL) -> chat eval -> report
#
#   bash runs/speedrun.sh                      # d12, micro-batch picked to fit this Mac's memory
#   bash runs/speedrun.sh --depth 20 --rl      # bigger model, with the GSM8K RL stage
#   bash runs/speedrun.sh --dry-run            # print every stage and its flags, download nothing
#
# Options:
#   --depth N          model depth (default 12); everything else derives from it
#   --shards N         pretraining shards to download (default: enough for the depth's horizon)
#   --memory-limit GiB memory budget for training, MLX capped there (default: 75% of what MLX reports)
#   --rl               also run chat_rl (GSM8K) after SFT
#   --run NAME         wandb run name (default: dummy = off)
#   --dry-run          print the stages and exit
#   -h, --help         this text
# Environment: MLXCHAT_BASE_DIR (default ~/.cache/mlxchat) is where everything is written.
set -euo pipefail
cd "$(dirname "$0")/.."

DEPTH=12; SHARDS=""; MEM=""; RL=0; RUN=dummy; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --depth) DEPTH="$2"; shift 2 ;;
    --shards) SHARDS="$2"; shift 2 ;;
    --memory-limit) MEM="$2"; shift 2 ;;
    --rl) RL=1; shift ;;
    --run) RUN="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
# ~12 tokens per scaling parameter; a ClimbMix shard holds ~55M tokens after tokenization (nanochat:
# ~150 shards for d24's 5.8B tokens, plus the ~35% cropped by best-fit packing)
if [ -z "$SHARDS" ]; then
  case "$DEPTH" in
    [1-9]) SHARDS=8 ;; 1[0-2]) SHARDS=32 ;; 1[3-6]) SHARDS=64 ;; 1[7-9]|20) SHARDS=120 ;; *) SHARDS=240 ;;
  esac
fi
MEMFLAG=(); [ -n "$MEM" ] && MEMFLAG=(--memory-limit "$MEM")

stage() {  # stage "description" command...
  echo
  echo "==> $1"
  shift
  echo "    $*"
  if [ "$DRY" = "0" ]; then "$@"; fi
}

PY=.venv/bin/python
if [ "$DRY" = "0" ]; then
  bash runs/setup.sh
fi
export MLXCHAT_BASE_DIR="${MLXCHAT_BASE_DIR:-$HOME/.cache/mlxchat}"
echo "speedrun: depth $DEPTH, $SHARDS shards, base dir $MLXCHAT_BASE_DIR$([ "$DRY" = 1 ] && echo ' (dry run)')"

stage "report: start a fresh report" $PY -m mlxchat.report reset
stage "data: the first 8 shards (+ the val shard) for the tokenizer" $PY -m mlxchat.dataset -n 8
if [ "$DRY" = "0" ]; then
  echo "    (downloading the rest, $SHARDS shards, in the background)"
  $PY -m mlxchat.dataset -n "$SHARDS" > "$MLXCHAT_BASE_DIR/download.log" 2>&1 &
  DL_PID=$!
else
  echo; echo "==> data: the remaining shards in the background"; echo "    $PY -m mlxchat.dataset -n $SHARDS &"
fi
stage "tokenizer: train (2B characters, vocab 32768)" $PY -m scripts.tok_train
stage "tokenizer: evaluate" $PY -m scripts.tok_eval
if [ "$DRY" = "0" ]; then
  echo "==> waiting for the download"; wait "$DL_PID"
fi
stage "pretrain d$DEPTH" $PY -m scripts.base_train --depth "$DEPTH" --device-batch-size auto "${MEMFLAG[@]}" --run "$RUN"
stage "base model: CORE, bits per byte, samples" $PY -m scripts.base_eval --device-batch-size 8
stage "SFT" $PY -m scripts.chat_sft "${MEMFLAG[@]}" --run "$RUN"
stage "chat eval (SFT)" $PY -m scripts.chat_eval -i sft
if [ "$RL" = "1" ]; then
  stage "RL on GSM8K" $PY -m scripts.chat_rl "${MEMFLAG[@]}" --run "$RUN"
  stage "chat eval (RL)" $PY -m scripts.chat_eval -i rl -a GSM8K
fi
stage "report card" $PY -m mlxchat.report generate
echo
echo "done. Talk to your model:  $PY -m scripts.chat_cli    or in the browser:  $PY -m scripts.chat_web"
