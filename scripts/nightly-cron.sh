#!/usr/bin/env bash
# Nightly stegopipe experiment from cron (see docs/batch.md). Usage:
#   scripts/nightly-cron.sh [EXPERIMENT] [stegopipe run options / key=value ...]
# crontab line (02:30 every night; cron has a bare environment, so set the paths there):
#   30 2 * * * STEGOPIPE_DATA_ROOT=/data STEGOPIPE_WEIGHTS_DIR=/weights /path/to/stegopipe/scripts/nightly-cron.sh table2
# Runs never overlap (flock: a night whose predecessor still runs is skipped and says so in the log). Output
# goes to logs/nightly-<experiment>-<date>.log; logs older than STEGOPIPE_LOG_DAYS (30) days are removed.
# After the run, `stegopipe gc` lists what no experiment references any more (a dry run: nothing is deleted).
set -uo pipefail

EXPERIMENT=${1:-${EXPERIMENT:-demo}}
shift $(( $# > 0 ? 1 : 0 ))
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEGO=${STEGO:-$REPO/.venv/bin/stegopipe}
LOG_DIR=${STEGOPIPE_LOG_DIR:-$REPO/logs}
export STEGOPIPE_ROOT=${STEGOPIPE_ROOT:-$REPO/artifacts}

mkdir -p "$LOG_DIR" || exit 1
LOG="$LOG_DIR/nightly-$EXPERIMENT-$(date +%F).log"
exec 9>"$LOG_DIR/.nightly-$EXPERIMENT.lock"
if ! flock -n 9; then
  echo "$(date -Is) a previous nightly run of $EXPERIMENT still holds the lock; skipped" >>"$LOG"
  exit 0
fi
find "$LOG_DIR" -maxdepth 1 -name 'nightly-*.log' -mtime "+${STEGOPIPE_LOG_DAYS:-30}" -delete

cd "$REPO" || exit 1
{
  echo "== $(date -Is) stegopipe run $EXPERIMENT $*"
  "$STEGO" run -v "$EXPERIMENT" "$@"
  status=$?
  echo "== $(date -Is) run exited with status $status; unreferenced artifacts (gc dry run):"
  "$STEGO" gc
  echo "== $(date -Is) done"
  exit "$status"
} >>"$LOG" 2>&1
