#!/usr/bin/env bash
# Stage 2 (one-for-all fine-tuning) on several GPUs of one machine with DDP, one process per GPU: the seed
# README's Stage 2 command under `torchrun` (default) or `accelerate launch` with scripts/accelerate_ddp.yaml.
#
#   scripts/launch_multi_gpu.sh                                   # 2 GPUs, torchrun
#   NGPU=8 scripts/launch_multi_gpu.sh                            # 8 GPUs
#   NGPU=8 LAUNCHER=accelerate scripts/launch_multi_gpu.sh        # the same through accelerate launch
#   NGPU=2 GRAD_ACC=2 scripts/launch_multi_gpu.sh                 # the 1-GPU global batch (4 x 1) on 2 GPUs
#   NGPU=8 scripts/launch_multi_gpu.sh --fsdp                     # the frozen base sharded over the 8 GPUs
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
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# One process per GPU: all NGPU of them visible (scripts/stage2_finetune.sh alone would keep GPU 0 only).
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NGPU - 1)))}

case "$LAUNCHER" in
  torchrun) LAUNCH="$PYTHON -m torch.distributed.run --nproc_per_node $NGPU --master_port $PORT" ;;
  accelerate) LAUNCH="$PYTHON -m accelerate.commands.launch --config_file scripts/accelerate_ddp.yaml \
--num_processes $NGPU --main_process_port $PORT" ;;
  *) echo "error: LAUNCHER must be torchrun or accelerate, not '$LAUNCHER'" >&2; exit 2 ;;
esac

# The seed's Stage 2 command, from scripts/stage2_finetune.sh, started by the launcher.
LAUNCH="$LAUNCH" exec bash scripts/stage2_finetune.sh "$@"
