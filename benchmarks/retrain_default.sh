#!/usr/bin/env bash
# Retrain the default model from scratch (feature extraction included), score it on the
# Flickr8k test split, and record the wall-clock minutes of each stage.
#   bash benchmarks/retrain_default.sh [DATA_DIR] [RUN_DIR]
# Writes RUN_DIR/timing.json, RUN_DIR/test_scores.json and RUN_DIR/captions-test.json.
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/default}
CACHE="$RUN/cache"  # a fresh cache, so extraction time is counted
mkdir -p "$RUN"
rm -rf "$CACHE"
now() { date +%s.%N; }
t0=$(now)
captioner prepare --config configs/flickr8k-default.json --data "$DATA" --cache-dir "$CACHE"
t1=$(now)
captioner train --config configs/flickr8k-default.json --data "$DATA" --cache-dir "$CACHE" --out "$RUN" --no-progress
t2=$(now)
captioner evaluate --data "$DATA" --split test --checkpoint "$RUN/best.pt" --cache-dir "$CACHE" \
  --beam-size 3 --captions-out "$RUN/captions-test.json" --json | tee "$RUN/evaluate.log"
tail -n 1 "$RUN/evaluate.log" > "$RUN/test_scores.json"
t3=$(now)
python3 - "$t0" "$t1" "$t2" "$t3" "$RUN/timing.json" <<'PY'
import json, os, platform, sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
timing = {"prepare_minutes": round((t1 - t0) / 60, 1), "train_minutes": round((t2 - t1) / 60, 1),
          "retrain_minutes": round((t2 - t0) / 60, 1), "evaluate_minutes": round((t3 - t2) / 60, 1),
          "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}
open(sys.argv[5], "w").write(json.dumps(timing, indent=2) + "\n")
print(json.dumps(timing))
PY
