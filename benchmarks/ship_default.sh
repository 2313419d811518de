#!/usr/bin/env bash
# From a finished training run to the shipped default model: pick the beam length penalty
# and n-gram blocking on dev, score the result on the Flickr8k test split, and export it.
#   bash benchmarks/ship_default.sh [DATA_DIR] [RUN_DIR]
# Writes RUN_DIR/length_penalty.json, RUN_DIR/model.pt, RUN_DIR/test_scores.json,
# RUN_DIR/captions-test.json and src/captioner/weights/default.pt (fp16, test scores inside).
# The test scores are those of the model as shipped: its tuned search and its precision.
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/default}
CACHE="$RUN/cache"
EXPORT_TO=${EXPORT_TO:-src/captioner/weights/default.pt}
# The decoder precision the model is scored and shipped with: bf16 runs its matrix products on
# bfloat16 weights where the CPU has native bf16 (fp32 elsewhere); see src/captioner/precision.py.
PRECISION=${PRECISION:-bf16}
python3 benchmarks/tune_length_penalty.py --checkpoint "$RUN/best.pt" --data "$DATA" --cache-dir "$CACHE" \
  --out "$RUN/length_penalty.json"
best() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$RUN/length_penalty.json" "$1"; }
captioner export "$RUN/best.pt" "$RUN/model.pt" --length-penalty "$(best best_length_penalty)" \
  --no-repeat-ngram "$(best best_no_repeat_ngram)" --precision "$PRECISION"
captioner evaluate --data "$DATA" --split test --checkpoint "$RUN/model.pt" --cache-dir "$CACHE" \
  --beam-size 3 --captions-out "$RUN/captions-test.json" --json | tee "$RUN/evaluate.log"
tail -n 1 "$RUN/evaluate.log" > "$RUN/test_scores.json"
captioner export "$RUN/model.pt" "$EXPORT_TO" --half --metrics "$RUN/test_scores.json"
