#!/usr/bin/env bash
# From a finished training run to the shipped default model: pick the beam length penalty
# and n-gram blocking on dev (or take them from SEARCH_FROM), score the result on the Flickr8k test split, and export it.
#   bash benchmarks/ship_default.sh [DATA_DIR] [RUN_DIR]
# Writes RUN_DIR/length_penalty.json, RUN_DIR/model.pt, RUN_DIR/test_scores.json,
# RUN_DIR/captions-test.json and src/captioner/weights/default.pt (fp16, test scores inside).
# The test scores are those of the model as shipped: its tuned search, its precision and its fp16 weights.
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/default}
CACHE="$RUN/cache"
EXPORT_TO=${EXPORT_TO:-src/captioner/weights/default.pt}
# The decoder precision the model is scored and shipped with: bf16 runs its matrix products on
# bfloat16 weights where the CPU has native bf16 (fp32 elsewhere); see src/captioner/precision.py.
PRECISION=${PRECISION:-bf16}
# Whether the model reads each photo's mirror image too (`captioner export --mirror-views`); the
# test scores are measured with the setting it ships with.
MIRROR_VIEWS=${MIRROR_VIEWS:-off}
# A refit (`train_on_dev`) takes its search from SEARCH_FROM (see search_from.sh).
source "$(dirname "$0")/search_from.sh"
check_mirror_views
check_search_from "$RUN/config.json"
if [ -n "${SEARCH_FROM:-}" ]; then
  python3 - "$SEARCH_FROM" "$RUN/length_penalty.json" <<'PY'
import json, sys
tuned = json.load(open(sys.argv[1]))
out = {"split": tuned["split"], "beam_size": tuned["beam_size"], "taken_from": sys.argv[1],
       "best_length_penalty": tuned["best_length_penalty"], "best_no_repeat_ngram": tuned["best_no_repeat_ngram"]}
open(sys.argv[2], "w").write(json.dumps(out, indent=2) + "\n")
PY
else
  python3 benchmarks/tune_length_penalty.py --checkpoint "$RUN/best.pt" --data "$DATA" --cache-dir "$CACHE" \
    --out "$RUN/length_penalty.json"
fi
best() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$RUN/length_penalty.json" "$1"; }
# fp16 already here, so the file scored is the file shipped: fp16 -> fp32 -> fp16 is exact, and the
# last export below only adds the test scores to it.
captioner export "$RUN/best.pt" "$RUN/model.pt" --length-penalty "$(best best_length_penalty)" \
  --no-repeat-ngram "$(best best_no_repeat_ngram)" --precision "$PRECISION" --mirror-views "$MIRROR_VIEWS" --half
captioner evaluate --data "$DATA" --split test --checkpoint "$RUN/model.pt" --cache-dir "$CACHE" \
  --beam-size 3 --captions-out "$RUN/captions-test.json" --json | tee "$RUN/evaluate.log"
tail -n 1 "$RUN/evaluate.log" > "$RUN/test_scores.json"
captioner export "$RUN/model.pt" "$EXPORT_TO" --half --metrics "$RUN/test_scores.json"
