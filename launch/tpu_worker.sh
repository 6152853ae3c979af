#!/usr/bin/env bash
# The worker side of launch/tpu.sh: runs ON each TPU VM worker (launch/tpu.sh calls it through
# `gcloud compute tpus tpu-vm ssh --worker=all`); not meant for your own machine.
#
# Layout on a worker (ROOT = the folder above the code, ~/pspnet_jax by default):
#   ROOT/code/      the git archive of the commit (this script is ROOT/code/launch/tpu_worker.sh)
#   ROOT/venv/      Python with the pinned jax[tpu]
#   ROOT/train.log  this worker's log of the latest start; run.pid / python.pid while it runs
#
#   tpu_worker.sh setup JAX_VERSION PYTHON_VERSION   venv + requirements.txt + jax[tpu]==JAX_VERSION
#   tpu_worker.sh start LOG_URL STOP_GRACE FLAG...   stop what runs, clear the TPU, start
#                                                    `python -m pspnet_jax.main FLAG...` detached
#   tpu_worker.sh stop STOP_GRACE                    SIGTERM the run (it saves a checkpoint)
#   tpu_worker.sh run LOG_URL FLAG...                (start's detached body) train, then copy
#                                                    the log and a result line to LOG_URL
#
# The result line, LOG_URL/worker-<n>.result, is `<n> done 0` (trained to the end),
# `<n> stopped 0` (stopped on request: SIGTERM, preemption notice; the checkpoint is saved and
# the same command resumes), `<n> killed <exit status>` (killed by a signal it could not handle:
# the VM going down, the OOM killer), `<n> busy 75` (another run's lock holds the workdir, e.g.
# the lease of a run on a slice that went away) or `<n> failed <exit status>`. The
# training command exits 0 in the first two cases, so the log line "stopped ... on request"
# tells them apart.
# DRY_RUN=1 prints the commands instead of running them (process ids as PYTHON_PID / RUN_PID).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
CODE_DIR=$REPO_ROOT
ROOT=$(dirname "$CODE_DIR")
VENV_PYTHON=$ROOT/venv/bin/python
TRAIN_LOG=$ROOT/train.log
: "${LOG_SYNC_SECONDS:=300}"   # a preempted VM takes its disk along: copy the log meanwhile
# libtpu refuses to start while this lock of an earlier process exists.
: "${LIBTPU_LOCKFILE:=/tmp/libtpu_lockfile}"

# This worker's index in the slice (0 = JAX process 0), from the TPU VM metadata server.
worker_number() {
  curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
    hostname
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

setup() {
  local jax_version=$1 python_version=$2
  # The images ship Python 3.10 and the project needs 3.11+: uv brings its own Python.
  run python3 -m pip install --user --upgrade uv
  local uv=$HOME/.local/bin/uv
  run "$uv" venv --allow-existing --python "$python_version" "$ROOT/venv"
  run "$uv" pip install --python "$VENV_PYTHON" -r "$CODE_DIR/requirements.txt" \
    "jax[tpu]==$jax_version"
  run "$VENV_PYTHON" -c 'import jax; print("jax", jax.__version__)'
}

# SIGTERM to the training process (a checkpoint is saved), STOP_GRACE seconds for it to end,
# then the whole process group is killed.
stop() {
  local grace=$1 waited=0
  if ! is_dry_run && ! alive "$ROOT/run.pid"; then
    return 0
  fi
  if is_dry_run || alive "$ROOT/python.pid"; then
    run kill -TERM "$(cat "$ROOT/python.pid" 2>/dev/null || echo PYTHON_PID)"
  fi
  while ! is_dry_run && alive "$ROOT/run.pid" && (( waited < grace )); do
    sleep 1
    waited=$((waited + 1))
  done
  if is_dry_run || alive "$ROOT/run.pid"; then
    run kill -KILL -- "-$(cat "$ROOT/run.pid" 2>/dev/null || echo RUN_PID)"
  fi
}

# Whatever else still holds the TPU (a crashed run's leftovers, a notebook) and the lockfile.
clear_tpu() {
  local pids=()
  if ! is_dry_run; then
    # The chips are /dev/accel* (v2-v4) or /dev/vfio/<n> (v5e, v5p, v6e).
    mapfile -t pids < <(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u || true)
  fi
  if (( ${#pids[@]} )); then
    log "killing processes that hold the TPU: ${pids[*]}"
    run sudo kill -KILL "${pids[@]}"
  fi
  run sudo rm -f "$LIBTPU_LOCKFILE"
}

start() {
  local log_url=$1 grace=$2
  shift 2
  stop "$grace"
  clear_tpu
  if is_dry_run; then
    quote_line setsid nohup bash "$0" run "$log_url" "$@"
    return
  fi
  : > "$TRAIN_LOG"
  # Detached from the ssh session (which returns at once): the run outlives your connection.
  setsid nohup bash "$0" run "$log_url" "$@" > /dev/null 2>&1 < /dev/null &
  # An empty log in the bucket at once: `tpu.sh watch` sees this start's folder.
  gcloud storage cp "$TRAIN_LOG" "$log_url/worker-$(worker_number).log"
}

run_training() {
  local log_url=$1
  shift
  local worker status result syncer
  worker=$(worker_number)
  echo "$$" > "$ROOT/run.pid"
  # The copier's sleep is killed with it (no stray process keeps the session alive).
  (trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
   while true; do
     sleep "$LOG_SYNC_SECONDS" &
     sleeper=$!
     wait "$sleeper" || break
     gcloud storage cp "$TRAIN_LOG" "$log_url/worker-$worker.log" > /dev/null 2>&1 || true
   done) &
  syncer=$!
  cd "$CODE_DIR"
  "$VENV_PYTHON" -m pspnet_jax.main "$@" >> "$TRAIN_LOG" 2>&1 &
  echo "$!" > "$ROOT/python.pid"
  status=0
  wait "$!" || status=$?
  kill "$syncer" 2>/dev/null || true
  if (( status > 128 )); then
    result=killed
  elif (( status == 75 )); then
    result=busy
  elif (( status != 0 )); then
    result=failed
  elif grep -q 'stopped .*on request' "$TRAIN_LOG"; then
    result=stopped
  else
    result="done"
  fi
  echo "$worker $result $status" > "$ROOT/result"
  rm -f "$ROOT/run.pid" "$ROOT/python.pid"
  gcloud storage cp "$TRAIN_LOG" "$log_url/worker-$worker.log"
  gcloud storage cp "$ROOT/result" "$log_url/worker-$worker.result"
}

main() {
  local command=${1:-}
  shift || true
  case $command in
    setup) (( $# == 2 )) || die "usage: $0 setup JAX_VERSION PYTHON_VERSION"; setup "$@" ;;
    start) (( $# >= 2 )) || die "usage: $0 start LOG_URL STOP_GRACE FLAG..."; start "$@" ;;
    stop) (( $# == 1 )) || die "usage: $0 stop STOP_GRACE"; stop "$@"; clear_tpu ;;
    run) (( $# >= 1 )) || die "usage: $0 run LOG_URL FLAG..."; run_training "$@" ;;
    *) die "usage: $0 setup|start|stop|run ... (see the header of this file)" ;;
  esac
}

main "$@"
