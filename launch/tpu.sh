#!/usr/bin/env bash
# Trains on a Cloud TPU slice (one or many hosts) from your own machine, with gcloud.
#
#   launch/tpu.sh create    obtain the slice: a queued resource (PROVISIONING=spot, reserved,
#                           best-effort, on-demand) or `tpu-vm create` (direct); waits for it
#   launch/tpu.sh setup     code (git archive of COMMIT via the bucket or scp) and a venv with
#                           jax[tpu] of the pinned version on every worker
#   launch/tpu.sh train     (re)start the training command on every worker, detached: a live
#                           run is stopped first (it saves a checkpoint), stale TPU users and the
#                           libtpu lockfile are cleared; each worker's log and result line go
#                           to LOG_URL/<UTC start time>/
#   launch/tpu.sh stop      SIGTERM the run on every worker (a checkpoint is saved)
#   launch/tpu.sh status    the slice's state and the latest run's results
#   launch/tpu.sh logs [W]  the end of worker W's live log (default 0; `all` for every worker)
#   launch/tpu.sh watch     keep the run going until it has finished (see watch() below)
#   launch/tpu.sh delete    tear the slice down (the bucket keeps the run directory and logs)
#
# Settings: launch/settings.env; any of them can be set in the environment instead.
# DRY_RUN=1 (or --dry-run as the first argument) prints every command, one per line and quoted
# for copy-and-paste, and runs none; a wait's state query appears once.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

GCLOUD_LOCATION=(--zone="$ZONE" --project="$PROJECT")
# Code and venv of every worker, relative to its home: the remote shell expands this `~`.
# shellcheck disable=SC2088
REMOTE_ROOT="~/$(quote "$REMOTE_DIR")"

queued() { [[ $PROVISIONING != direct ]]; }

# ---- the slice ---------------------------------------------------------------------------------

create() {
  local provisioning_flag create_flags=()
  read -r -a create_flags <<< "$CREATE_FLAGS"
  case $PROVISIONING in
    spot) provisioning_flag=(--spot) ;;
    reserved) provisioning_flag=(--reserved) ;;
    # --best-effort exists only in `gcloud alpha` (its reference lists it; GA does not).
    best-effort) provisioning_flag=(--best-effort) ;;
    on-demand|direct) provisioning_flag=() ;;
    *) die "PROVISIONING=$PROVISIONING: use spot, reserved, best-effort, on-demand or direct" ;;
  esac
  if queued; then
    local gcloud=(gcloud)
    [[ $PROVISIONING == best-effort ]] && gcloud=(gcloud alpha)
    run "${gcloud[@]}" compute tpus queued-resources create "$QUEUED_RESOURCE" \
      --node-id="$TPU_NAME" "${GCLOUD_LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$RUNTIME_VERSION" "${provisioning_flag[@]}" "${create_flags[@]}"
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${create_flags[@]}"
  fi
  wait_until_ready
}

delete() {
  if queued; then
    # --force deletes the queued resource's TPU VMs too.
    run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${GCLOUD_LOCATION[@]}" \
      --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --quiet
  fi
}

# The state of the queued resource (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or of the
# directly created node (READY, PREEMPTED, ...); NOT_FOUND when there is none. Other gcloud
# failures (network, quota of API calls) return 1: not a reason to recreate anything.
slice_state() {
  local query
  if queued; then
    query=(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE"
           "${GCLOUD_LOCATION[@]}" --format='value(state.state)')
  else
    query=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_LOCATION[@]}"
           --format='value(state)')
  fi
  if is_dry_run; then
    quote_line "${query[@]}" >&3
    echo DRY_RUN
    return
  fi
  local errors state
  errors=$(mktemp)
  if state=$("${query[@]}" 2>"$errors"); then
    rm -f "$errors"
    echo "$state"
  elif grep -qiE 'NOT_FOUND|not found' "$errors"; then
    rm -f "$errors"
    echo NOT_FOUND
  else
    cat "$errors" >&2
    rm -f "$errors"
    return 1
  fi
}

wait_until_ready() {
  local state
  while true; do
    state=$(slice_state) || state=UNKNOWN
    is_dry_run && return 0
    case $state in
      ACTIVE|READY) log "$TPU_NAME is ready"; return 0 ;;
      FAILED|SUSPENDED|PREEMPTED|TERMINATED|NOT_FOUND)
        log "$TPU_NAME is $state while waiting for it"; return 1 ;;
      *) log "$TPU_NAME is $state; next look in ${WATCH_INTERVAL}s"; sleep "$WATCH_INTERVAL" ;;
    esac
  done
}

# ---- code, environment, training ---------------------------------------------------------------

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker=all \
    --command="$1"
}

setup() {
  local commit archive name version fetch=""
  [[ $CODE_TRANSFER == bucket || $CODE_TRANSFER == scp ]] ||
    die "CODE_TRANSFER=$CODE_TRANSFER: use bucket or scp"
  version=$(jax_version)
  commit=$(git rev-parse --short=12 --verify "$COMMIT^{commit}")
  if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
    log "warning: uncommitted changes are not sent; the workers get commit $commit"
  fi
  name=pspnet_jax-$commit.tar.gz
  archive=${TMPDIR:-/tmp}/$name
  run git archive --format=tar.gz --output="$archive" "$commit"
  # The archive lands in each worker's home (a new worker has no other folder yet).
  case $CODE_TRANSFER in
    bucket)
      run gcloud storage cp "$archive" "$CODE_URL/$name"
      fetch="gcloud storage cp $(quote "$CODE_URL/$name") ~/$name && " ;;
    scp)
      run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:$name" "${GCLOUD_LOCATION[@]}" \
        --worker=all ;;
  esac
  ssh_all "${fetch}mkdir -p $REMOTE_ROOT && cd $REMOTE_ROOT && rm -rf code && mkdir code && \
tar -xzf ~/$name -C code && rm ~/$name && \
bash code/launch/tpu_worker.sh setup $(quote "$version") $(quote "$PYTHON_VERSION")"
}

# The folder of this start's logs and results: LOG_URL/<UTC time> (sorts by time).
new_run_url() { echo "$LOG_URL/${RUN_STAMP:-$(date -u +%Y%m%d-%H%M%S)}"; }

train() {
  local run_url
  run_url=$(new_run_url)
  # --distributed: jax.distributed finds the other workers by Cloud TPU auto-detection.
  train_args
  TRAIN_ARGS+=(--distributed)
  ssh_all "bash $REMOTE_ROOT/code/launch/tpu_worker.sh start $(quote_line "$run_url" \
"$STOP_GRACE" "${TRAIN_ARGS[@]}")"
  log "started; logs and results in $run_url/"
}

stop() {
  ssh_all "bash $REMOTE_ROOT/code/launch/tpu_worker.sh stop $(quote "$STOP_GRACE")"
}

# The folder of the latest start (empty if none), and its result lines.
latest_run_url() {
  local query=(gcloud storage ls "$LOG_URL/")
  if is_dry_run; then
    quote_line "${query[@]}" >&3
    echo "$LOG_URL/LATEST/"
    return
  fi
  "${query[@]}" 2>/dev/null | grep '/$' | sort | tail -n 1 || true
}

run_results() {
  local query=(gcloud storage cat "$1*.result")
  if is_dry_run; then
    quote_line "${query[@]}" >&3
    return
  fi
  "${query[@]}" 2>/dev/null || true
}

# In a dry run the latest start's folder is shown as LATEST (it is read from the listing).
status() {
  local state url results
  state=$(slice_state) || state=UNKNOWN
  url=$(latest_run_url)
  results=""
  [[ -n $url ]] && results=$(run_results "$url")
  is_dry_run && return
  echo "$TPU_NAME: $state"
  echo "latest run: ${url:-none}"
  [[ -z $results ]] || printf '%s\n' "$results"
}

logs() {
  local worker=${1:-0}
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOCATION[@]}" --worker="$worker" \
    --command="tail -n 100 $REMOTE_ROOT/train.log"
}

# ---- watch -------------------------------------------------------------------------------------

# Keeps the run going until it has finished:
#   slice gone, PREEMPTED, SUSPENDED, FAILED, TERMINATED, STOPPED -> delete what is left, create,
#       setup, train (the same command resumes from the last checkpoint in the workdir)
#   ready, no run started yet -> train
#   ready, a worker's result `stopped` or `killed` (SIGTERM, maintenance, OOM) -> train again
#   ready, a worker's result `busy` (the workdir's lock is held) -> train again after
#       WATCH_INTERVAL seconds (a lease left by a lost slice expires within 5 minutes)
#   ready, worker 0's result `done` -> finished, exit 0 (DELETE_WHEN_DONE=1: delete the slice)
#   ready, a worker's result `failed` -> exit 1: a bug or bad data, not a preemption; read the logs
#   anything else (queued, provisioning, running) -> look again in WATCH_INTERVAL seconds
# Recreations and restarts together are capped by MAX_RECREATIONS (then exit 1).
# A dry run prints the commands of one recovery: state query, delete, create, setup, train.
watch() {
  if is_dry_run; then
    recover "$(slice_state)"
    return
  fi
  local state url results restarts=0
  while true; do
    if ! state=$(slice_state); then
      log "could not read the state of $TPU_NAME; next look in ${WATCH_INTERVAL}s"
      sleep "$WATCH_INTERVAL"
      continue
    fi
    case $state in
      ACTIVE|READY)
        url=$(latest_run_url)
        results=""
        [[ -n $url ]] && results=$(run_results "$url")
        if [[ -z $url ]]; then
          log "$TPU_NAME is $state and no run was started: starting one"
          attempt train
        elif grep -q '^0 done ' <<< "$results"; then
          log "finished: worker 0 trained to the end (logs in $url)"
          if [[ $DELETE_WHEN_DONE == 1 ]]; then
            delete
          fi
          return 0
        elif grep -q ' failed ' <<< "$results"; then
          log "the run failed, not preempted:"
          printf '%s\n' "$results" >&2
          die "see the logs in $url (launch/tpu.sh logs all)"
        elif grep -qE ' (stopped|killed|busy) ' <<< "$results"; then
          count_restart "$restarts"
          restarts=$((restarts + 1))
          if grep -q ' busy ' <<< "$results"; then
            # The lease of a run on a slice that went away lasts until it expires.
            log "another run's lock holds the workdir: starting again in ${WATCH_INTERVAL}s"
            sleep "$WATCH_INTERVAL"
          else
            log "the run was stopped or killed: starting it again (it resumes)"
          fi
          attempt train
        else
          log "$TPU_NAME is $state, the run is going; next look in ${WATCH_INTERVAL}s"
          sleep "$WATCH_INTERVAL"
        fi
        ;;
      NOT_FOUND|PREEMPTED|SUSPENDED|FAILED|TERMINATED|STOPPED)
        count_restart "$restarts"
        restarts=$((restarts + 1))
        log "$TPU_NAME is $state: recreating it"
        attempt recover "$state"
        ;;
      *)
        log "$TPU_NAME is $state; next look in ${WATCH_INTERVAL}s"
        sleep "$WATCH_INTERVAL"
        ;;
    esac
  done
}

# Runs "$@" in a subshell with its own errexit: a failing step (the slice went away during
# setup, an ssh error) ends this attempt, not the watch; the next look decides again.
# (Called as `"$@" || ...`, bash would ignore errexit inside altogether.)
attempt() {
  local status
  set +e
  (set -e; "$@")
  status=$?
  set -e
  if (( status != 0 )); then
    # Not at once: a create refused for quota would otherwise use up MAX_RECREATIONS in seconds.
    log "$1 stopped (exit $status); next look in ${WATCH_INTERVAL}s"
    sleep "$WATCH_INTERVAL"
  fi
}

count_restart() {
  (( $1 < MAX_RECREATIONS )) ||
    die "gave up after $1 recreations / restarts (MAX_RECREATIONS=$MAX_RECREATIONS)"
}

# Delete what is left of the slice (unless nothing is), create, setup, train.
recover() {
  [[ $1 == NOT_FOUND ]] || delete
  create
  setup
  train
}

# ------------------------------------------------------------------------------------------------

main() {
  if dry_run_flag "${1:-}"; then
    shift
  fi
  local command=${1:-}
  shift || true
  case $command in
    create|setup|train|stop|status|watch|delete) (( $# == 0 )) || die "$command takes no arguments"
                                                 "$command" ;;
    logs) (( $# <= 1 )) || die "usage: $0 logs [WORKER|all]"; logs "$@" ;;
    *) usage ;;
  esac
}

main "$@"
