# Sourced by launch/deepspeed.sh and launch/accelerate.sh: run a launcher and exit with the ranks' code
# (2 bad input, 3 a lost rank, 75 preempted or Ctrl-C, 130 a second Ctrl-C), which every rank writes to
# $CLTRAIN_EXIT_DIR (train/lifecycle.py), instead of the launcher's own (often 1 for any failure).
# launch/torchrun.sh does the same in Python (train/launch.py), and also keeps torchrun's traceback away.
run_ranks() {
  local dir rc code f
  dir=$(mktemp -d "${TMPDIR:-/tmp}/cltrain-exit-XXXXXX")
  CLTRAIN_EXIT_DIR="$dir" "$@"
  rc=$?
  code=""
  for f in $(ls "$dir" 2>/dev/null | grep '^rank-[0-9]*$' | sort -t- -k2 -n); do
    c=$(cat "$dir/$f")
    if [ -z "$code" ] || { [ "$code" = 0 ] && [ "$c" != 0 ]; }; then code=$c; fi
  done
  rm -rf "$dir"
  exit "${code:-$rc}"
}
