#!/usr/bin/env bash
# Stage 2 (one-for-all fine-tuning) on several GPUs of one machine with DDP, one process per GPU: the seed
# README's Stage 2 command under `torchrun` (default) or `accelerate launch` with scripts/accelerate_ddp.yaml.
#
#   scripts/launch_multi_gpu.sh                                   # 2 GPUs, torchrun
#   NGPU=8 scripts/launch_multi_gpu.sh                            # 8 GPUs
#   NGPU=8 LAUNCHER=accelerate scripts/launch_multi_gpu.sh        # the same through accelerate launch
#   NGPU=2 GRAD_ACC=2 scripts/launch_multi_gpu.sh                 # the 1-GPU global batch (4 x 1) on 2 GPUs
#   NGPU=2 MAX_STEPS=2 SOURCE_LEN=64 TARGET_LEN=32 EVAL_SIZE=16 \
#     scripts/launch_multi_gpu.sh --use_cpu True --ddp_backend gloo   # a smoke run as 2 CPU processes
#
# Every process samples the same subnets in a step (they are drawn from the seed and the global step), DDP
# averages the adapters' gradients, and the loss balancing uses the loss averaged over processes, so a step
# on N processes equals one step on their whole global batch: per-device batch x GRAD_ACC x NGPU.
# Checkpoints, adapters and results are written by the first process only. Extra arguments go to main.py
# (later flags win). MODEL, OUT, DATASET, STRATEGY, MIN_LAYERS, MAX_STEPS, SAVE_STEPS, EVAL_STEPS,
# SOURCE_LEN, TARGET_LEN, EVAL_SIZE, WIDTH and MOE mean what they mean in scripts/stage2_finetune.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

NGPU=${NGPU:-2}
LAUNCHER=${LAUNCHER:-torchrun}
PORT=${PORT:-29500}
MODEL=${MODEL:-models/smollm2-135m-instruct}
OUT=${OUT:-output/ft}
DATASET=${DATASET:-alpaca-gpt4}
STRATEGY=${STRATEGY:-dp_selection_strategy.npy}
MIN_LAYERS=${MIN_LAYERS:-18}
MAX_STEPS=${MAX_STEPS:-10000}
SAVE_STEPS=${SAVE_STEPS:-1000}
EVAL_STEPS=${EVAL_STEPS:-1000}
SOURCE_LEN=${SOURCE_LEN:-384}
TARGET_LEN=${TARGET_LEN:-128}
EVAL_SIZE=${EVAL_SIZE:-1024}
GRAD_ACC=${GRAD_ACC:-4}
WIDTH=${WIDTH---shrinkable_width --width_choice [1,7/8,3/4,5/8] --prune_width_method flap}
MOE=${MOE---use_moe_lora --moe_num_expert 5 --moe_topk 2}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

case "$LAUNCHER" in
  torchrun) LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" --master_port "$PORT") ;;
  accelerate) LAUNCH=("$PYTHON" -m accelerate.commands.launch --config_file scripts/accelerate_ddp.yaml
                      --num_processes "$NGPU" --main_process_port "$PORT") ;;
  *) echo "error: LAUNCHER must be torchrun or accelerate, not '$LAUNCHER'" >&2; exit 2 ;;
esac

# shellcheck disable=SC2086  # WIDTH and MOE are lists of flags
"${LAUNCH[@]}" main.py --model_name_or_path "$MODEL" --output_dir "$OUT" --dataset "$DATASET" \
  --do_train True --do_eval True --do_mmlu_eval True --do_eval_wikitext2 True --lora_modules all --fp16 \
  --source_max_len "$SOURCE_LEN" --target_max_len "$TARGET_LEN" --gradient_accumulation_steps "$GRAD_ACC" \
  --logging_steps 10 --max_steps "$MAX_STEPS" --save_strategy steps --data_seed 42 --save_steps "$SAVE_STEPS" \
  --save_total_limit 1 --evaluation_strategy steps --eval_dataset_size "$EVAL_SIZE" --max_eval_samples 1000 \
  --eval_steps "$EVAL_STEPS" --optim paged_adamw_32bit --ddp_find_unused_parameters --enable_shrinking \
  --kd_weight 1 --min_num_layer "$MIN_LAYERS" --random_sample_num_layer 2 --distill_method sp \
  --shrinking_method calib_dp --shrinking_file "$STRATEGY" $WIDTH $MOE "$@"
