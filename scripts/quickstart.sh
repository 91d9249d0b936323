#!/usr/bin/env bash
# The main job on the default model, end to end, on small settings (CPU-friendly; uses a GPU if present):
# set up, materialise SmolLM2-135M-Instruct, Stage 1 (layer DP, FLAP widths, merge), a short one-for-all
# fine-tuning, evaluation of a few shapes, export of one shape; then print the results table and paths.
#   bash scripts/quickstart.sh                 (OUT=output/quickstart STEPS=30 to change the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-output/quickstart}
STEPS=${STEPS:-30}
export TOKENIZERS_PARALLELISM=false
if [[ -z "${AMOEBA_DATA_DIR:-}" && -d ../shared/data ]]; then
  export AMOEBA_DATA_DIR=$(cd ../shared/data && pwd)
fi
# No data directory and no hub (HF_HUB_OFFLINE=1 counts as none): fall back to the bundled synthetic sample.
if [[ -z "${AMOEBA_DATA_DIR:-}" ]] && ! $PY -c '
import os, sys, threading, urllib.request
if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
    sys.exit(1)
ok = []
def probe():  # in a thread, so a hanging name lookup cannot outlast the 5 s limit either
    try:
        urllib.request.urlopen(urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                                                      method="HEAD"), timeout=5)
        ok.append(1)
    except urllib.error.HTTPError:
        ok.append(1)  # the server answered
    except Exception:
        pass
t = threading.Thread(target=probe, daemon=True)
t.start()
t.join(6)
sys.exit(0 if ok else 1)'; then
  export AMOEBA_DATA_DIR=$(cd amoeba/sample_data && pwd)
  echo "WARNING: the Hugging Face hub is not reachable and no data directory is set: using the bundled synthetic" \
       "sample ($AMOEBA_DATA_DIR). The results of this run come from made-up data and mean nothing."
fi
[[ -n "${AMOEBA_DATA_DIR:-}" ]] && echo "data: $AMOEBA_DATA_DIR" || echo "data: the Hugging Face hub (set AMOEBA_DATA_DIR for offline files)"
MODEL=models/smollm2-135m-instruct
$PY main.py --materialize_default_model
COMMON=(--model_name_or_path "$MODEL" --do_train False --do_eval False --no_eval_orig)

echo "== Stage 1 step 1: layer selection by dynamic programming (C4 perplexity) =="
# Small on purpose: 2 windows of 128 tokens, depths 30..22 (the layer DP scores about 200 subnets).
$PY main.py "${COMMON[@]}" --output_dir "$OUT/calib_dp" --layer_calib_dp --enable_shrinking --calib_dataset c4 \
  --num_calib_sample 2 --calib_seqlen 128 --min_num_layer 22 --dp_keep_last_layer 1
echo "== Stage 1 step 2: width selection (FLAP) =="
$PY main.py "${COMMON[@]}" --output_dir "$OUT/width_calib" --width_calib --calib_dataset c4 \
  --num_calib_sample 32 --calib_seqlen 256 --prune_width_method flap
echo "== Stage 1 step 3: merge =="
$PY utils/merge_depth_width.py --depth "$OUT/calib_dp/final_strategy.npy" \
  --width_mask "$OUT/width_calib/width_mask.npy" --width_bias "$OUT/width_calib/width_bias.npy" \
  --out "$OUT/dp_selection_strategy.npy"
SHAPE=(--enable_shrinking --min_num_layer 22 --shrinking_method calib_dp --shrinking_file "$OUT/dp_selection_strategy.npy"
       --shrinkable_width --width_choice "[1,7/8,3/4,5/8]" --prune_width_method flap
       --use_moe_lora --moe_num_expert 5 --moe_topk 2 --lora_r 16 --lora_alpha 32)
echo "== Stage 2: one-for-all fine-tuning ($STEPS steps) =="
$PY main.py --model_name_or_path "$MODEL" --output_dir "$OUT/ft" --dataset alpaca-gpt4 --do_train True \
  --do_eval False --no_eval_orig --lora_modules all --source_max_len 128 --target_max_len 64 \
  --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --max_steps "$STEPS" --logging_steps 5 \
  --save_steps "$STEPS" --save_total_limit 1 --learning_rate 2e-4 --gradient_checkpointing False \
  --kd_weight 1 --random_sample_num_layer 1 --distill_method sp "${SHAPE[@]}"
echo "== Evaluation of a few shapes =="
$PY main.py --model_name_or_path "$MODEL" --output_dir "$OUT/ft" --do_train False --do_eval True --no_eval_orig \
  --do_eval_wikitext2 True --max_wikitext2_windows 4 --do_lm_eval True --do_lm_eval_task arc_easy --lm_eval_limit 100 \
  --eval_num_layer 30,26,22 --eval_num_width 1,0.75 "${SHAPE[@]}"
echo "== Export the 22-layer, 3/4-width subnet =="
$PY main.py --model_name_or_path "$MODEL" --output_dir "$OUT/ft" --do_train False --eval_num_layer 22 \
  --eval_num_width 0.75 --export_dir "$OUT/export_l22w0.75" --overwrite "${SHAPE[@]}"
echo
cat "$OUT/ft/results.md" 2>/dev/null || true
echo
echo "strategy:       $OUT/dp_selection_strategy.md"
echo "metrics:        $OUT/ft/metrics.json"
echo "frontier plot:  $OUT/ft/frontier.png"
if [[ -f "$OUT/export_l22w0.75/modeling_amoeba.py" ]]; then
  echo "exported model: $OUT/export_l22w0.75  (per-layer widths: AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True); check: python scripts/check_export.py --folder $OUT/export_l22w0.75)"
else
  echo "exported model: $OUT/export_l22w0.75  (AutoModelForCausalLM.from_pretrained loads it)"
fi
