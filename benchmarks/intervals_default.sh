#!/usr/bin/env bash
# The README's `intervals-default` block: the shipped default's own test intervals, what its
# self-critical soup added over its cross-entropy start, and how it compares with the default
# before it (`refit-one-trajectory`, read from git at PREVIOUS), on the same test photos.
#   bash benchmarks/intervals_default.sh [DATA_DIR] [RUN_DIR]
# Also writes benchmarks/results/scst_gain.json, the SCST gain the model card quotes, from the same
# scoring as the intervals' captions (one scst_gain.py run, not two).
# RUN_DIR is the default's retrain run (its best-xe.pt, best.pt, feature cache and shipped file's test
# captions). Writes the other captions files under runs/intervals-default (they hold the references: never in the repo), then
# benchmarks/results/intervals-default.json and the README block.
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/default}
PREVIOUS=${PREVIOUS:-12b86ef}  # the last commit whose shipped default.pt was refit-one-trajectory
OUT=runs/intervals-default
# captions-test.json is the shipped file's, as ship_default.sh had `captioner evaluate` write it
for f in "$RUN/best-xe.pt" "$RUN/best.pt" "$RUN/cache" "$RUN/captions-test.json"; do
  [ -e "$f" ] || { echo "error: $f missing: give the default's retrain run (README, Results)" >&2; exit 2; }
done
mkdir -p "$OUT"
git show "$PREVIOUS:src/captioner/weights/default.pt" > "$OUT/refit-one-trajectory.pt"
captioner evaluate --data "$DATA" --split test --cache-dir "$RUN/cache" --checkpoint "$OUT/refit-one-trajectory.pt" \
  --captions-out "$OUT/refit-one-trajectory/captions-test.json" --json
python3 benchmarks/scst_gain.py --xe "$RUN/best-xe.pt" --scst "$RUN/best.pt" --data "$DATA" --cache-dir "$RUN/cache" \
  --captions-dir "$OUT/scst" --out benchmarks/results/scst_gain.json  # the model card's SCST gain, too
python3 benchmarks/intervals.py --out benchmarks/results/intervals-default.json --block intervals-default --readme \
  --pair "cross-entropy → SCST soup (the default's run, plain beam)" test "$OUT/scst/captions-test-xe.json" \
         "$OUT/scst/captions-test-scst.json" \
  --pair "refit-one-trajectory (previous default) → the default" test \
         "$OUT/refit-one-trajectory/captions-test.json" "$RUN/captions-test.json"
