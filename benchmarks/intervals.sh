#!/usr/bin/env bash
# The README's `intervals` block, from the captions it compares:
#   bash benchmarks/intervals.sh [DATA_DIR] [RUN_DIR]
# RUN_DIR is the train-only rerun of the default's recipe (runs/tuned-mirror, see "Mirror views" in
# the README), whose mirror-views captions benchmarks/mirror_views.py has written to runs/mirror_views.
# Writes its captions files under runs/intervals (they hold the references: never in the repo),
# then benchmarks/results/intervals.json and the README block.
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/tuned-mirror}
VIEWS=runs/mirror_views
OUT=runs/intervals
for split in dev test; do
  for setting in off on; do
    if [ ! -f "$VIEWS/captions-$split-$setting.json" ]; then
      echo "error: $VIEWS/captions-$split-$setting.json missing: run benchmarks/mirror_views.py first (README)" >&2
      exit 2
    fi
  done
done
python3 benchmarks/scst_gain.py --xe "$RUN/best-xe.pt" --scst "$RUN/best.pt" --data "$DATA" --cache-dir "$RUN/cache" \
  --captions-dir "$OUT/scst-rerun" --out "$OUT/scst_gain-rerun.json"
captioner evaluate --data "$DATA" --split test --cache-dir "$RUN/cache" \
  --captions-out "$OUT/default/captions-test.json" --json
python3 benchmarks/intervals.py --readme \
  --pair "mirror views off → on (train-only rerun)" dev "$VIEWS/captions-dev-off.json" "$VIEWS/captions-dev-on.json" \
  --pair "mirror views off → on (train-only rerun)" test "$VIEWS/captions-test-off.json" "$VIEWS/captions-test-on.json" \
  --pair "cross-entropy → SCST (train-only rerun, plain beam)" test "$OUT/scst-rerun/captions-test-xe.json" \
         "$OUT/scst-rerun/captions-test-scst.json" \
  --pair "train-only rerun → the default (refit)" test "$VIEWS/captions-test-off.json" "$OUT/default/captions-test.json"
