#!/usr/bin/env bash
# Export one subnet of an AmoebaLLM run as a standard, smaller Hugging Face model folder.
#
#   scripts/export_subnet.sh                                  # 24 layers x 7/8 width into output/export-l24w0.875
#   LAYERS=20 WIDTH=0.625 scripts/export_subnet.sh            # another shape
#   BUDGET_PARAMS=60% scripts/export_subnet.sh                # the best shape within 60% of the parameters
#   BUDGET_LATENCY_MS=8 LATENCY_TABLE=output/bench_latency.json scripts/export_subnet.sh
#   MOE="" RUN_DIR=output/base scripts/export_subnet.sh       # the base model, no adapters
#   OVERWRITE=1 scripts/export_subnet.sh                      # replace an existing export folder
#   EXPORT_FORMAT=padded scripts/export_subnet.sh             # a stock folder (no custom code), padded
#
# RUN_DIR is the Stage 2 output (adapters in adapter_model/ are merged into the exported weights; its
# metrics.json, when present, ranks shapes for a budget). The base model is loaded in bf16: adapters
# cannot be merged into 4/8-bit weights. The folder loads with AutoModelForCausalLM.from_pretrained (add
# trust_remote_code=True when it holds modeling_amoeba.py: per-layer widths, every layer at its own size;
# EXPORT_FORMAT=padded writes a stock folder padded to the widest layer instead) and records where it came
# from in amoeba_export.json. CUDA_VISIBLE_DEVICES is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/smollm2-135m-instruct}
RUN_DIR=${RUN_DIR:-output/ft}
STRATEGY=${STRATEGY:-dp_selection_strategy.npy}
MIN_LAYERS=${MIN_LAYERS:-18}
LAYERS=${LAYERS:-24}
WIDTH=${WIDTH:-0.875}
WIDTH_CHOICE=${WIDTH_CHOICE:-[1,7/8,3/4,5/8]}
MOE=${MOE---use_moe_lora --moe_num_expert 5 --moe_topk 2}
PYTHON=${PYTHON:-python}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

EXTRA=()
[[ -n "${OVERWRITE:-}" ]] && EXTRA+=(--overwrite)
[[ -n "${EXPORT_FORMAT:-}" ]] && EXTRA+=(--export_format "$EXPORT_FORMAT")
[[ -n "${BUDGET_PARAMS:-}" ]] && EXTRA+=(--budget_params "$BUDGET_PARAMS")
[[ -n "${BUDGET_LATENCY_MS:-}" ]] && EXTRA+=(--budget_latency_ms "$BUDGET_LATENCY_MS")
[[ -n "${LATENCY_TABLE:-}" ]] && EXTRA+=(--latency_table "$LATENCY_TABLE")
[[ -n "${LATENCY_KEY:-}" ]] && EXTRA+=(--latency_key "$LATENCY_KEY")
[[ -n "${BUDGET_METRIC:-}" ]] && EXTRA+=(--budget_metric "$BUDGET_METRIC")
if [[ -z "${EXPORT_DIR:-}" ]]; then
  if [[ -n "${BUDGET_PARAMS:-}${BUDGET_LATENCY_MS:-}" ]]; then EXPORT_DIR=output/export-budget
  else EXPORT_DIR=output/export-l${LAYERS}w${WIDTH}; fi
fi

# shellcheck disable=SC2086  # MOE is a list of flags
"$PYTHON" main.py --model_name_or_path "$MODEL" --output_dir "$RUN_DIR" --do_train False --bf16 \
  --enable_shrinking --min_num_layer "$MIN_LAYERS" --shrinking_method calib_dp --shrinking_file "$STRATEGY" \
  --shrinkable_width --width_choice "$WIDTH_CHOICE" --prune_width_method flap $MOE \
  --eval_num_layer "$LAYERS" --eval_num_width "$WIDTH" --export_dir "$EXPORT_DIR" "${EXTRA[@]}"
