#!/usr/bin/env bash
# Release a new default model, end to end, with every figure its model card and docs/results.md
# quote:
#   bash release/release.sh [DATA_DIR] [RUN_DIR]
# 1. retrain: release/retrain.sh's timed `captioner prepare` (fresh cache) and `captioner train`
#    with configs/flickr8k-release.json (the recipe's defaults, refit on train + dev);
# 2. search: the beam's length penalty and n-gram blocking. A refit cannot tune on dev (it trained
#    on it), so they come from the train-only run it refits (SEARCH_FROM, a tune_search.py output);
#    with TUNE=1 they are tuned on dev for this run instead (a recipe without train_on_dev);
# 3. export: fp16 weights with the search settings, scored on the Flickr8k test split
#    (`captioner evaluate`), then shipped as src/captioner/weights/default.pt with its scores,
#    and its recognition head rebuilt (shipped only where it meets the agreement bar);
# 4. SCST gain and bootstrap intervals (release/scst_gain.py, release/intervals.py);
# 5. the model card and docs/results.md's blocks (release/model_card.py).
# Writes RUN_DIR/{timing.json,lscpu.txt,length_penalty.json,test_scores.json,captions-test.json}.
# Ship only a model that beats the current default on dev: the release is a decision, not a rerun.
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/release}
CONFIG=${CONFIG:-configs/flickr8k-release.json}
SEARCH_FROM=${SEARCH_FROM:-benchmarks/results/tuned-mirror/length_penalty.json}
EXPORT_TO=${EXPORT_TO:-src/captioner/weights/default.pt}
CACHE="$RUN/cache"  # retrain.sh fills it afresh, so extraction time is counted
[ -f "$CONFIG" ] || { echo "error: CONFIG=$CONFIG: no such file" >&2; exit 2; }
[ -n "${TUNE:-}" ] || [ -f "$SEARCH_FROM" ] || { echo "error: SEARCH_FROM=$SEARCH_FROM: no such file" >&2; exit 2; }
here=$(dirname "$0")
NO_REPRODUCE=1 CONFIG="$CONFIG" bash "$here/retrain.sh" "$DATA" "$RUN"  # step 1, timed
if [ -n "${TUNE:-}" ]; then
  python3 "$here/tune_search.py" --checkpoint "$RUN/best.pt" --data "$DATA" --cache-dir "$CACHE" \
    --out "$RUN/length_penalty.json"
else
  python3 - "$SEARCH_FROM" "$RUN/length_penalty.json" <<'PY'
import json, sys
tuned = json.load(open(sys.argv[1]))
out = {"split": tuned["split"], "beam_size": tuned["beam_size"], "taken_from": sys.argv[1],
       "best_length_penalty": tuned["best_length_penalty"], "best_no_repeat_ngram": tuned["best_no_repeat_ngram"]}
open(sys.argv[2], "w").write(json.dumps(out, indent=2) + "\n")
PY
fi
best() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$RUN/length_penalty.json" "$1"; }
captioner export "$RUN/best.pt" "$RUN/model.pt" --length-penalty "$(best best_length_penalty)" \
  --no-repeat-ngram "$(best best_no_repeat_ngram)" --precision "${PRECISION:-bf16}" --half
captioner evaluate --data "$DATA" --split test --checkpoint "$RUN/model.pt" --cache-dir "$CACHE" \
  --beam-size 3 --captions-out "$RUN/captions-test.json" --json | tee "$RUN/evaluate.log"
tail -n 1 "$RUN/evaluate.log" > "$RUN/test_scores.json"
captioner export "$RUN/model.pt" "$EXPORT_TO" --half --metrics "$RUN/test_scores.json"
# the recognition head is bound to the exported file: the old one no longer fits; a new one ships
# only where it agrees with the stock classifier well enough (release/recognition_head.py)
rm -f "${EXPORT_TO%.pt}.recognition.pt"
python3 "$here/recognition_head.py" --checkpoint "$EXPORT_TO" --data "$DATA" --cache-dir "$CACHE"
python3 "$here/scst_gain.py" --xe "$RUN/best-xe.pt" --scst "$RUN/best.pt" --data "$DATA" --cache-dir "$CACHE" \
  --captions-dir "$RUN/scst" --out benchmarks/results/scst_gain.json
python3 "$here/intervals.py" --out benchmarks/results/intervals-default.json --block intervals-default --readme \
  --pair "cross-entropy → SCST soup (plain beam)" test "$RUN/scst/captions-test-xe.json" "$RUN/scst/captions-test-scst.json"
python3 "$here/model_card.py" "$RUN"
