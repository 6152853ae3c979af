#!/usr/bin/env bash
# Trains on GPUs: one multi-GPU machine, or a SLURM cluster through launch/slurm_train.sbatch.
#
#   launch/gpu.sh setup    the repository's venv (PYTHON) with requirements.txt and jax[cuda13]
#                          of the pinned version; on a cluster run it once on a login node
#                          (the repository on a filesystem every node mounts)
#   launch/gpu.sh train    one machine: ONE process drives all its visible GPUs (no
#                          jax.distributed); CUDA_VISIBLE_DEVICES picks a subset
#   launch/gpu.sh submit   sbatch launch/slurm_train.sbatch on NODES whole nodes with
#                          GPUS_PER_NODE tasks each (one task per GPU); the job inherits your
#                          environment, so settings overridden here reach it
#
# Settings: launch/settings.env (TRAIN_*, PYTHON, NODES, GPUS_PER_NODE, PARTITION, TIME_LIMIT,
# SLURM_LOG_DIR); any of them can be set in the environment instead.
# DRY_RUN=1 (or --dry-run as the first argument) prints the commands instead of running them.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$REPO_ROOT"

setup() {
  local version venv
  version=$(jax_version)
  venv=$(dirname "$(dirname "$PYTHON")")
  run python3 -m venv "$venv"
  run "$PYTHON" -m pip install -r requirements.txt "jax[cuda13]==$version"
  run "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
}

train() {
  train_args
  run "$PYTHON" -m pspnet_jax.main "${TRAIN_ARGS[@]}"
}

submit() {
  local partition=()
  [[ -z $PARTITION ]] || partition=(--partition="$PARTITION")
  # Flags on the command line win over the #SBATCH lines of the script.
  # From the repository root (this script's working directory): the job's working directory.
  run sbatch --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" \
    --gpus-per-node="$GPUS_PER_NODE" --time="$TIME_LIMIT" "${partition[@]}" \
    launch/slurm_train.sbatch
}

main() {
  if dry_run_flag "${1:-}"; then
    shift
  fi
  local command=${1:-}
  shift || true
  case $command in
    setup|train|submit) (( $# == 0 )) || die "$command takes no arguments"; "$command" ;;
    *) usage ;;
  esac
}

main "$@"
