#!/usr/bin/env bash
# Stage 2, one-for-all fine-tuning: the seed README's Stage 2 command (Llama-2 variant, with elastic
# width and shape-aware MoE-LoRA), for SmolLM2-135M-Instruct by default.
#
#   scripts/stage2_finetune.sh                                    # the seed's settings, 10000 steps
#   MAX_STEPS=1000 DATASET=alpaca-clean scripts/stage2_finetune.sh        # a shorter run on Alpaca-cleaned
#   WIDTH="" MOE="" scripts/stage2_finetune.sh                    # depth only, plain LoRA (the Llama-3.1 variant)
#   BITS=4 scripts/stage2_finetune.sh                             # 4-bit NF4 base model (CUDA only)
#   MAX_STEPS=2 SOURCE_LEN=64 TARGET_LEN=32 EVAL_SIZE=16 scripts/stage2_finetune.sh   # a smoke run on a CPU
#   RESUME=1 scripts/stage2_finetune.sh                           # continue from the last checkpoint
#   GRAD_ACC=2 scripts/stage2_finetune.sh                         # gradient accumulation (the seed's 4 by default)
#
# STRATEGY is the Stage 1 file (dp_selection_strategy.npy). OUT gets adapter_model/, checkpoints,
# training_log.json, train_results.json and loss_curve.png. AMOEBA_DATA_DIR (offline data laid out like
# shared/data) is used when set; otherwise the dataset comes from the Hugging Face hub. Extra arguments are
# passed on to main.py (later flags win).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/smollm2-135m-instruct}
OUT=${OUT:-output/ft}
DATASET=${DATASET:-alpaca-gpt4}
STRATEGY=${STRATEGY:-dp_selection_strategy.npy}
MIN_LAYERS=${MIN_LAYERS:-18}          # the seed keeps 20 of Llama-2's 32 layers; 18 of SmolLM2's 30 is alike
MAX_STEPS=${MAX_STEPS:-10000}
SAVE_STEPS=${SAVE_STEPS:-1000}
EVAL_STEPS=${EVAL_STEPS:-1000}
SOURCE_LEN=${SOURCE_LEN:-384}
TARGET_LEN=${TARGET_LEN:-128}
EVAL_SIZE=${EVAL_SIZE:-1024}
BITS=${BITS:-16}
WIDTH=${WIDTH---shrinkable_width --width_choice [1,7/8,3/4,5/8] --prune_width_method flap}
MOE=${MOE---use_moe_lora --moe_num_expert 5 --moe_topk 2}
GRAD_ACC=${GRAD_ACC:-4}
PYTHON=${PYTHON:-python}
# LAUNCH: what starts main.py (default: $PYTHON); scripts/launch_multi_gpu.sh puts torchrun/accelerate here.
read -r -a LAUNCH_CMD <<< "${LAUNCH:-$PYTHON}"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

EXTRA=()
[[ -n "${RESUME:-}" ]] && EXTRA+=(--resume_training)

# shellcheck disable=SC2086  # WIDTH and MOE are lists of flags
"${LAUNCH_CMD[@]}" main.py --model_name_or_path "$MODEL" --output_dir "$OUT" --dataset "$DATASET" \
  --do_train True --do_eval True --do_mmlu_eval True --do_eval_wikitext2 True --lora_modules all --fp16 \
  --source_max_len "$SOURCE_LEN" --target_max_len "$TARGET_LEN" --gradient_accumulation_steps "$GRAD_ACC" \
  --logging_steps 10 --max_steps "$MAX_STEPS" --save_strategy steps --data_seed 42 --save_steps "$SAVE_STEPS" \
  --save_total_limit 1 --evaluation_strategy steps --eval_dataset_size "$EVAL_SIZE" --max_eval_samples 1000 \
  --eval_steps "$EVAL_STEPS" --optim paged_adamw_32bit --ddp_find_unused_parameters --enable_shrinking \
  --kd_weight 1 --min_num_layer "$MIN_LAYERS" --random_sample_num_layer 2 --distill_method sp \
  --shrinking_method calib_dp --shrinking_file "$STRATEGY" --bits "$BITS" $WIDTH $MOE "${EXTRA[@]}" "$@"
