#!/usr/bin/env bash
# Run experiments.train (or experiments.prepare) on every worker of a Cloud TPU VM pod slice
# (see launch/README.md).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] [-- extra absl flags for the module]

Runs the same command on all workers of a TPU VM pod slice through
  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command "..."
Every worker starts `python3 -m experiments.train --config=... --workdir=... --distributed=on`;
JAX finds the other workers itself (TPU VM metadata), so no coordinator flags are needed.

Required (environment variable or option):
  TPU_NAME   -t NAME    the TPU VM (pod slice) name
  ZONE       -z ZONE    its zone, e.g. us-central2-b
  WORKDIR    -w DIR     run directory every worker can reach, e.g. gs://bucket/runs/name
Optional:
  PROJECT    -p ID      gcloud project (default: gcloud's configured project)
  CONFIG     -c FILE    training config (default: experiments/configs/bouncing_tiny.py;
                        append :smoke etc. as with experiments.train)
  REPO_DIR   -d DIR     checkout on the workers (default: magi_jax, relative to $HOME)
  PYTHON                interpreter on the workers (default: python3)
  SETUP=1    -s         first clone the repository (or fetch it) at REF into REPO_DIR on
                        every worker and install it: pip install -U "jax[tpu]" && pip install -e .
  REPO_URL   -u URL     repository to clone (required with -s when REPO_DIR has no checkout)
  REF        -r REF     branch, tag or commit to check out with -s (default: main)
  DETACH=1   -b         run in the background (nohup) on every worker, logging to
                        REPO_DIR/tpu_pod_train.log, so the run survives a dropped ssh session
  DRY_RUN=1  -n         print the gcloud commands instead of running them
  -h                    this text

Everything after `--` goes to experiments.train unchanged, e.g. mesh and config overrides:
  launch/tpu_pod.sh -t my-v4-32 -z us-central2-b -w gs://my-bucket/runs/b1 -s -u URL \
      -- --config.mesh.fsdp=-1 --config.mesh.data=1
EOF
}

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
WORKDIR="${WORKDIR:-}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-experiments/configs/bouncing_tiny.py}"
MODULE="${MODULE:-experiments.train}"
REPO_DIR="${REPO_DIR:-magi_jax}"
PYTHON="${PYTHON:-python3}"
SETUP="${SETUP:-0}"
REPO_URL="${REPO_URL:-}"
REF="${REF:-main}"
DETACH="${DETACH:-0}"
DRY_RUN="${DRY_RUN:-0}"

while getopts ":t:z:w:p:c:d:u:r:m:sbnh" opt; do
  case "$opt" in
    t) TPU_NAME="$OPTARG" ;;
    z) ZONE="$OPTARG" ;;
    w) WORKDIR="$OPTARG" ;;
    p) PROJECT="$OPTARG" ;;
    c) CONFIG="$OPTARG" ;;
    d) REPO_DIR="$OPTARG" ;;
    u) REPO_URL="$OPTARG" ;;
    r) REF="$OPTARG" ;;
    m) MODULE="$OPTARG" ;;
    s) SETUP=1 ;;
    b) DETACH=1 ;;
    n) DRY_RUN=1 ;;
    h) usage; exit 0 ;;
    :) echo "error: -$OPTARG needs a value (see -h)" >&2; exit 2 ;;
    *) echo "error: unknown option -$OPTARG (see -h)" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi
EXTRA_FLAGS=("$@")

missing=()
[[ -n "$TPU_NAME" ]] || missing+=("TPU_NAME (-t): the TPU VM pod slice name")
[[ -n "$ZONE" ]] || missing+=("ZONE (-z): the TPU's zone, e.g. us-central2-b")
case "$MODULE" in
  experiments.train|experiments.prepare) ;;
  *) echo "error: MODULE (-m) must be experiments.train or experiments.prepare, got $MODULE" >&2
     exit 2 ;;
esac
if [[ "$MODULE" == experiments.train ]]; then
  [[ -n "$WORKDIR" ]] || missing+=("WORKDIR (-w): a run directory all workers share, e.g. gs://bucket/runs/name")
fi
if ((${#missing[@]})); then
  echo "error: missing required settings:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  echo "(see launch/tpu_pod.sh -h)" >&2
  exit 2
fi
if [[ "$MODULE" == experiments.train && "$WORKDIR" != gs://* ]]; then
  echo "warning: WORKDIR=$WORKDIR is not a gs:// path; every worker must see the same" \
       "directory (checkpoints are written collectively)" >&2
fi
if [[ "$SETUP" == 1 && -z "$REPO_URL" ]]; then
  echo "note: SETUP without REPO_URL (-u): REPO_DIR must already be a git checkout on every worker" >&2
fi

# Quote every word for the remote shell: the remote command is one string.
q() { local out; out=$(printf '%q ' "$@"); printf '%s' "${out% }"; }

remote_setup=""
if [[ "$SETUP" == 1 ]]; then
  clone="echo \"error: \$HOME/$(q "$REPO_DIR") is not a git checkout; pass REPO_URL (-u)\" >&2; exit 2"
  if [[ -n "$REPO_URL" ]]; then clone="git clone $(q "$REPO_URL" "$REPO_DIR")"; fi
  remote_setup="if [ ! -d $(q "$REPO_DIR")/.git ]; then $clone; fi
git -C $(q "$REPO_DIR") fetch --tags origin $(q "$REF")
git -C $(q "$REPO_DIR") checkout --detach FETCH_HEAD
$(q "$PYTHON") -m pip install -U 'jax[tpu]'
$(q "$PYTHON") -m pip install -e $(q "$REPO_DIR")
"
fi

run_args=(-m "$MODULE" "--config=$CONFIG")
if [[ "$MODULE" == experiments.train ]]; then run_args+=("--workdir=$WORKDIR"); fi
train=$(q "$PYTHON" "${run_args[@]}" --distributed=on ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"})
if [[ "$DETACH" == 1 ]]; then
  train="nohup $train > tpu_pod_train.log 2>&1 < /dev/null &
echo \"\$(hostname): started, log: \$PWD/tpu_pod_train.log\""
fi

remote="set -euo pipefail
cd \"\$HOME\"
${remote_setup}cd $(q "$REPO_DIR")
$train"

gcloud_args=(compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all)
if [[ -n "$PROJECT" ]]; then gcloud_args+=(--project "$PROJECT"); fi

if [[ "$DRY_RUN" == 1 ]]; then
  printf 'gcloud'; printf ' %q' "${gcloud_args[@]}" --command "$remote"; printf '\n'
  exit 0
fi
if ! command -v gcloud > /dev/null; then
  echo "error: gcloud not found; install the Google Cloud CLI (or use -n for a dry run)" >&2
  exit 2
fi
exec gcloud "${gcloud_args[@]}" --command "$remote"
