#!/usr/bin/env bash
# Evaluate subnets of an AmoebaLLM run: the seed README's evaluation command, for SmolLM2-135M-Instruct.
#
#   scripts/evaluate.sh                                   # the seed's shape: 24 layers x 7/8 width
#   LAYERS=30,26,22,18 WIDTHS=1,0.75,0.625 scripts/evaluate.sh   # a grid: table + frontier plot
#   RUN_DIR=output/ft MMLU_SAMPLES=64 LM_EVAL_LIMIT=40 scripts/evaluate.sh   # quick run (e.g. on a CPU)
#   MOE="" RUN_DIR=output/base scripts/evaluate.sh        # the base model, no adapters
#
# RUN_DIR is the Stage 2 output (it holds adapter_model/); metrics.json, results.md and frontier.png are
# written there. AMOEBA_DATA_DIR (offline data laid out like shared/data) is used when set; otherwise the
# data comes from the Hugging Face hub. CUDA_VISIBLE_DEVICES is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/smollm2-135m-instruct}
RUN_DIR=${RUN_DIR:-output/ft}
STRATEGY=${STRATEGY:-dp_selection_strategy.npy}
MIN_LAYERS=${MIN_LAYERS:-18}
LAYERS=${LAYERS:-24}
WIDTHS=${WIDTHS:-0.875}
WIDTH_CHOICE=${WIDTH_CHOICE:-[1,7/8,3/4,5/8]}
TASKS=${TASKS:-arc_easy,piqa,hellaswag}
MOE=${MOE---use_moe_lora --moe_num_expert 5 --moe_topk 2}
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

# The seed loads the base model in 8 bits (bitsandbytes), which needs a CUDA GPU; bf16 elsewhere.
if [[ -z "${BITS:-}" ]]; then
  if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then BITS=8; else BITS=16; fi
fi

EXTRA=()
[[ -n "${MMLU_SAMPLES:-}" ]] && EXTRA+=(--max_mmlu_samples "$MMLU_SAMPLES")
[[ -n "${LM_EVAL_LIMIT:-}" ]] && EXTRA+=(--lm_eval_limit "$LM_EVAL_LIMIT")
[[ -n "${WIKITEXT2:-}" ]] && EXTRA+=(--do_eval_wikitext2 True)

# shellcheck disable=SC2086  # MOE is a list of flags
"$PYTHON" main.py --model_name_or_path "$MODEL" --output_dir "$RUN_DIR" --do_train False --do_eval True \
  --do_mmlu_eval True --bits "$BITS" --bf16 --enable_shrinking --min_num_layer "$MIN_LAYERS" \
  --shrinking_method calib_dp --shrinking_file "$STRATEGY" --shrinkable_width --width_choice "$WIDTH_CHOICE" \
  --prune_width_method flap $MOE --eval_num_layer "$LAYERS" --eval_num_width "$WIDTHS" \
  --do_lm_eval True --do_lm_eval_task "$TASKS" "${EXTRA[@]}" "$@"
