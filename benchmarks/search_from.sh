# Sourced by retrain_default.sh and ship_default.sh. A refit (`train_on_dev`) has trained on dev,
# so dev cannot tune its beam search: it takes the one tuned for the train-only run it refits,
# SEARCH_FROM=<that run's length_penalty.json>.
# check_search_from CONFIG_JSON: exits 2 with an error naming what is wrong when SEARCH_FROM names
# no file, or when CONFIG_JSON is a refit's and SEARCH_FROM is unset; returns otherwise (also when
# CONFIG_JSON does not exist, as for an ensemble's folder).
check_search_from() {
  if [ -n "${SEARCH_FROM:-}" ] && [ ! -f "$SEARCH_FROM" ]; then
    echo "error: SEARCH_FROM=$SEARCH_FROM: no such file (give a run's length_penalty.json)" >&2
    exit 2
  fi
  if [ -z "${SEARCH_FROM:-}" ] && python3 -c "import json, os, sys; p = sys.argv[1]
sys.exit(0 if os.path.isfile(p) and json.load(open(p)).get('train_on_dev') else 1)" "$1"; then
    echo "error: $1 has train_on_dev: dev cannot tune its search; set SEARCH_FROM to the" \
      "length_penalty.json of the train-only run it refits (the default's:" \
      "benchmarks/results/tuned-mirror/length_penalty.json)" >&2
    exit 2
  fi
}

# check_mirror_views: exits 2 naming the value when MIRROR_VIEWS (ship_default.sh's setting, given
# to `captioner export --mirror-views`) is set to anything but on or off, before anything runs.
check_mirror_views() {
  case "${MIRROR_VIEWS:-off}" in
    on|off) ;;
    *) echo "error: MIRROR_VIEWS=$MIRROR_VIEWS: must be on or off" >&2; exit 2 ;;
  esac
}
