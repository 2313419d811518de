#!/usr/bin/env bash
# Retrain the default model from scratch (feature extraction included), pick the beam
# length penalty and n-gram blocking on dev, score the model on the Flickr8k test split, and ship it.
#   bash benchmarks/retrain_default.sh [DATA_DIR] [RUN_DIR]
# CONFIG=configs/flickr8k-transformer.json EXPORT_TO=runs/transformer/model-fp16.pt bash ... runs another
# recipe the same way without replacing the shipped model. The default recipe is a refit on
# train + dev, so it runs as SEARCH_FROM=benchmarks/results/tuned-mirror/length_penalty.json bash ...
# Writes RUN_DIR/timing.json (retrain minutes = prepare + train, measured here), RUN_DIR/lscpu.txt,
# RUN_DIR/length_penalty.json, RUN_DIR/test_scores.json, RUN_DIR/captions-test.json, and the
# shipped model src/captioner/weights/default.pt (fp16, with its test scores inside).
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/default}
CONFIG=${CONFIG:-configs/flickr8k-default.json}
CACHE="$RUN/cache"  # a fresh cache, so extraction time is counted
# A refit (`train_on_dev`) takes its beam search from the train-only run it refits: say which
# before training starts, not after it.
source "$(dirname "$0")/search_from.sh"
check_mirror_views
check_search_from "$CONFIG"
mkdir -p "$RUN"
# the CPU the minutes are measured on (they compare only on the same CPU model)
lscpu > "$RUN/lscpu.txt" 2>/dev/null || true
rm -rf "$CACHE"
now() { date +%s.%N; }
timing() {  # timing.json from the stage boundaries seen so far
  python3 - "$RUN/timing.json" "$@" <<'PY'
import json, os, platform, sys
t = list(map(float, sys.argv[2:]))
out = {"prepare_minutes": round((t[1] - t[0]) / 60, 1), "train_minutes": round((t[2] - t[1]) / 60, 1),
       "retrain_minutes": round((t[2] - t[0]) / 60, 1), "cpus": os.cpu_count(),
       "machine": platform.machine()}
if len(t) > 3:
    out["tune_and_evaluate_minutes"] = round((t[3] - t[2]) / 60, 1)
open(sys.argv[1], "w").write(json.dumps(out, indent=2) + "\n")
print(json.dumps(out))
PY
}
t0=$(now)
captioner prepare --config "$CONFIG" --data "$DATA" --cache-dir "$CACHE"
t1=$(now)
captioner train --config "$CONFIG" --data "$DATA" --cache-dir "$CACHE" --out "$RUN" --no-progress
t2=$(now)
timing "$t0" "$t1" "$t2"
bash benchmarks/ship_default.sh "$DATA" "$RUN"
timing "$t0" "$t1" "$t2" "$(now)"
