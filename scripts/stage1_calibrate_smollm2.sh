#!/usr/bin/env bash
# Stage 1 for SmolLM2-135M-Instruct: the seed README's three steps, producing the shipped
# dp_selection_strategy.npy (and its readable .json/.md view) at the repository root.
#
#   scripts/stage1_calibrate_smollm2.sh                         # as shipped (CPU or GPU)
#   DP_SAMPLES=32 DP_SEQLEN=512 FLAP_SAMPLES=512 FLAP_SEQLEN=2048 scripts/stage1_calibrate_smollm2.sh   # GPU sizes
#   RESUME=1 scripts/stage1_calibrate_smollm2.sh                # keep a step whose output already exists
#
# Depth is calibrated on perplexity of the C4 sample, not on MMLU as the seed does for Llama-2-7B: at
# 135M parameters MMLU accuracy is near chance (about 25%), so the seed's 320 questions (40 batches of 8)
# cannot rank layers. WikiText-2 is left out of calibration because the benchmarks report its test split.
# FLAP uses the same C4 sample.
# MODEL: the model folder; AMOEBA_DATA_DIR: offline data laid out like shared/data (unset: the hub).
# CUDA_VISIBLE_DEVICES is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/smollm2-135m-instruct}
export AMOEBA_DATA_DIR=${AMOEBA_DATA_DIR:-../shared/data}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
OUT=${OUT:-output/smollm2_stage1}
MIN_LAYERS=${MIN_LAYERS:-18}             # depths 30..18 (the 30-layer model down to 60%)
WIDTH_CHOICE=${WIDTH_CHOICE:-[1,7/8,3/4,5/8]}
CALIB=${CALIB:-c4}
DP_SAMPLES=${DP_SAMPLES:-8}              # windows of DP_SEQLEN tokens scored per candidate subnet
DP_SEQLEN=${DP_SEQLEN:-256}
FLAP_SAMPLES=${FLAP_SAMPLES:-128}
FLAP_SEQLEN=${FLAP_SEQLEN:-256}
PYTHON=${PYTHON:-python}
RESUME=${RESUME:-0}

done_already() { [[ "$RESUME" == 1 ]] && for f in "$@"; do [[ -f "$f" ]] || return 1; done; }

# Step 1: layer selection by dynamic programming.
if done_already "$OUT/calib_dp/final_strategy.npy"; then
  echo "step 1: keeping $OUT/calib_dp/final_strategy.npy"
else
  "$PYTHON" main.py --model_name_or_path "$MODEL" --bf16 --output_dir "$OUT/calib_dp" --do_train False \
    --do_eval False --no_eval_orig --layer_calib_dp --calib_dataset "$CALIB" --enable_shrinking \
    --num_calib_sample "$DP_SAMPLES" --calib_seqlen "$DP_SEQLEN" --min_num_layer "$MIN_LAYERS" \
    --dp_keep_last_layer 1
fi

# Step 2: width selection with FLAP (global, with bias compensation).
if done_already "$OUT/width_calib/width_mask.npy" "$OUT/width_calib/width_bias.npy"; then
  echo "step 2: keeping $OUT/width_calib/width_mask.npy"
else
  "$PYTHON" main.py --model_name_or_path "$MODEL" --bf16 --output_dir "$OUT/width_calib" --do_train False \
    --do_eval False --no_eval_orig --width_calib --calib_dataset "$CALIB" --num_calib_sample "$FLAP_SAMPLES" \
    --calib_seqlen "$FLAP_SEQLEN" --prune_width_method flap --width_choice "$WIDTH_CHOICE"
fi

# Step 3: merge, then ship at the repository root.
"$PYTHON" utils/merge_depth_width.py --depth "$OUT/calib_dp/final_strategy.npy" \
  --width_mask "$OUT/width_calib/width_mask.npy" --width_bias "$OUT/width_calib/width_bias.npy" \
  --out "$OUT/dp_selection_strategy.npy"
for ext in npy json md; do
  cp "$OUT/dp_selection_strategy.$ext" ".dp_selection_strategy.$ext.tmp"  # then rename: never half a file
  mv ".dp_selection_strategy.$ext.tmp" "dp_selection_strategy.$ext"
done
echo "dp_selection_strategy.npy written (view: dp_selection_strategy.md)"
