#!/usr/bin/env bash
# Retrain the shipped recipe from scratch, timed, and check that it reproduces the shipped model:
#   bash release/retrain.sh [DATA_DIR] [RUN_DIR]
# 1. `captioner prepare` (feature extraction into a fresh cache, so it is counted) and
#    `captioner train` with CONFIG (default configs/flickr8k-release.json), both timed:
#    RUN_DIR/timing.json holds the retrain minutes (prepare + train) and RUN_DIR/lscpu.txt the CPU;
# 2. release/reproduce.py: the retrained model and the shipped one captioned on the Flickr8k test
#    split the same way, and the retrain's CIDEr-D held against the shipped score's bootstrap
#    interval (RUN_DIR/reproduce.json; --out also writes it to benchmarks/results/).
# release/release.sh runs step 1 the same way before it ships a new model.
set -euo pipefail
DATA=${1:-../shared/data/flickr8k}
RUN=${2:-runs/retrain}
CONFIG=${CONFIG:-configs/flickr8k-release.json}
[ -f "$CONFIG" ] || { echo "error: CONFIG=$CONFIG: no such file" >&2; exit 2; }
[ -d "$DATA" ] || { echo "error: $DATA: no such dataset folder" >&2; exit 2; }
here=$(dirname "$0")
mkdir -p "$RUN"
lscpu > "$RUN/lscpu.txt" 2>/dev/null || true  # the minutes compare only on the same CPU model
CACHE="$RUN/cache"
rm -rf "$CACHE"
now() { date +%s.%N; }
t0=$(now)
captioner prepare --config "$CONFIG" --data "$DATA" --cache-dir "$CACHE" --no-progress
t1=$(now)
captioner train --config "$CONFIG" --data "$DATA" --cache-dir "$CACHE" --out "$RUN" --no-progress
t2=$(now)
python3 - "$RUN/timing.json" "$CONFIG" "$t0" "$t1" "$t2" <<'PY'
import json, os, platform, sys
t = list(map(float, sys.argv[3:]))
out = {"config": sys.argv[2], "prepare_minutes": round((t[1] - t[0]) / 60, 1),
       "train_minutes": round((t[2] - t[1]) / 60, 1), "retrain_minutes": round((t[2] - t[0]) / 60, 1),
       "cpus": os.cpu_count(), "machine": platform.machine(),
       "isa_env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                              "FBGEMM_ENABLE_INSTRUCTIONS") if k in os.environ}}
open(sys.argv[1], "w").write(json.dumps(out, indent=2) + "\n")
print(json.dumps(out))
PY
if [ -z "${NO_REPRODUCE:-}" ]; then
  python3 "$here/reproduce.py" --run "$RUN" --data "$DATA" --cache-dir "$CACHE" ${REPRODUCE_OUT:+--out "$REPRODUCE_OUT"}
fi
