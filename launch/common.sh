# shellcheck shell=bash source-path=SCRIPTDIR
# Shared helpers of the launch scripts; sourced, not run.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Gives: the settings (launch/settings.env, environment wins), `run` (a command, or with
# DRY_RUN=1 its shell-quoted line on stdout instead), `dry_run_flag`, `usage`, `quote`,
# `jax_version`, `train_args`.
# Everything a script says besides the commands goes to stderr, so that a dry run's stdout is
# exactly the commands, one per line, ready to copy and paste.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=settings.env
source "$LAUNCH_DIR/settings.env"
: "${DRY_RUN:=0}"
# A dry run prints to fd 3, the script's stdout, so that a command substitution that captures a
# function's output (a state query inside a wait) cannot swallow the printed commands.
exec 3>&1

log() { printf '[launch] %s\n' "$*" >&2; }
die() { printf '[launch] error: %s\n' "$*" >&2; exit 1; }

# One word, quoted for a POSIX shell only where it needs to be (the rules of Python's
# shlex.quote, which the tests use to read the dry-run lines back).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The command line of "$@", each word quoted.
quote_line() {
  local word out=()
  for word in "$@"; do out+=("$(quote "$word")"); done
  printf '%s\n' "${out[*]}"
}

is_dry_run() { [[ $DRY_RUN == 1 ]]; }

# A script's `--dry-run` first argument: sets DRY_RUN=1 and is true (the caller shifts it off).
dry_run_flag() { [[ ${1:-} == --dry-run ]] && DRY_RUN=1; }

# The script's header comment, its usage, on stderr; exit 2.
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

# Runs a command; a dry run prints it instead.
run() {
  if is_dry_run; then quote_line "$@" >&3; else "$@"; fi
}

# The JAX version for the accelerator machines: JAX_VERSION, or the lower bound of the
# `jax[cpu]>=X,<Y` pin in requirements.txt (the version the project is tested with).
jax_version() {
  if [[ -n $JAX_VERSION ]]; then
    printf '%s\n' "$JAX_VERSION"
    return
  fi
  local version
  version=$(sed -n 's/^jax\[cpu\]>=\([0-9][0-9.]*\),.*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ -n $version ]] || die "no 'jax[cpu]>=X,<Y' line in requirements.txt; set JAX_VERSION"
  printf '%s\n' "$version"
}

# The flags of `python -m pspnet_jax.main`, the same on every machine, in the array TRAIN_ARGS:
# config, run directory, data directory, then TRAIN_FLAGS.
train_args() {
  local extra_flags=()
  read -r -a extra_flags <<< "$TRAIN_FLAGS"
  # shellcheck disable=SC2034  # the result, read by the scripts that source this file
  TRAIN_ARGS=("--config=$TRAIN_CONFIG" "--workdir=$TRAIN_WORKDIR"
              "--config.data.data_dir=$TRAIN_DATA_DIR" "${extra_flags[@]}")
}
