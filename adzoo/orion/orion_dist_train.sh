#!/usr/bin/env bash
# Launch the standalone ORION-KD training (this repository's loop, e.g. the miniature world) on GPUS
# processes per node with torchrun, with ORION's command line. Not part of the overlay: in an ORION
# checkout, ORION's own adzoo/orion/orion_dist_train.sh runs ORION's train.py.
#
#   ./adzoo/orion/orion_dist_train.sh CONFIG GPUS [extra train_kd.py args]
#
# Multi-node settings come from the environment: NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (or ORION's MLP_WORKER_NUM, MLP_ROLE_INDEX, MLP_WORKER_0_HOST,
# MLP_WORKER_0_PORT). Without CUDA the processes use Gloo on the CPU. Output is
# also written to work_dirs/<config name>/ (or the --work-dir given).
# PYTHON selects the interpreter (default: the repository's .venv/bin/python when it exists, else python3,
# else python).
set -uo pipefail

usage() {
    cat >&2 <<EOF
usage: $0 CONFIG GPUS [extra args for adzoo/orion/train_kd.py]
  CONFIG  training config file, e.g. adzoo/orion/configs/orion_stage3_kd_train.py
  GPUS    processes (GPUs) per node, a positive integer
  environment: NNODES NODE_RANK MASTER_ADDR MASTER_PORT (or MLP_WORKER_NUM MLP_ROLE_INDEX
               MLP_WORKER_0_HOST MLP_WORKER_0_PORT)
  PYTHON  the interpreter (default: the repository's .venv/bin/python when it exists, else python3);
          e.g. PYTHON=/path/to/env/bin/python $0 CONFIG GPUS
EOF
}

fail() {
    echo "error: $*" >&2
    usage
    exit 2
}

[ $# -ge 2 ] || fail "expected CONFIG and GPUS, got $# argument(s)"
CONFIG=$1
GPUS=$2
shift 2
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || fail "GPUS must be a positive integer, got '$GPUS'"
[ -f "$CONFIG" ] || fail "config file not found: $CONFIG"

NNODES=${NNODES:-${MLP_WORKER_NUM:-1}}
NODE_RANK=${NODE_RANK:-${MLP_ROLE_INDEX:-0}}
MASTER_ADDR=${MASTER_ADDR:-${MLP_WORKER_0_HOST:-127.0.0.1}}
MASTER_PORT=${MASTER_PORT:-${MLP_WORKER_0_PORT:-29500}}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES must be a positive integer, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
    || fail "NODE_RANK must be an integer in [0, NNODES=$NNODES), got '$NODE_RANK'"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || fail "MASTER_PORT must be an integer, got '$MASTER_PORT'"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"
    elif command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi

# Where the console output is teed: --work-dir if given, else work_dirs/<config name>/.
LOG_DIR="work_dirs/$(basename "${CONFIG%.*}")"
prev=""
for arg in "$@"; do
    case "$arg" in
        --work-dir=*|--work_dir=*) LOG_DIR="${arg#*=}" ;;
    esac
    if [ "$prev" = "--work-dir" ] || [ "$prev" = "--work_dir" ]; then LOG_DIR="$arg"; fi
    prev="$arg"
done
mkdir -p "$LOG_DIR" || fail "cannot create $LOG_DIR"
LOG_FILE="$LOG_DIR/dist_train_$(date +%Y%m%d_%H%M%S)_node${NODE_RANK}.log"

echo "orion_dist_train: $GPUS process(es) x $NNODES node(s), node_rank $NODE_RANK, master $MASTER_ADDR:$MASTER_PORT," \
     "python $PYTHON, log $LOG_FILE"
# launch.py checks the config, the arguments and (node 0) the port before torchrun starts anything,
# and exits with the children's status: 2 after a user error (printed as one "error:" line).
"$PYTHON" "$ROOT/adzoo/orion/launch.py" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$MASTER_PORT" \
    --nproc_per_node="$GPUS" \
    -- "$ROOT/adzoo/orion/train_kd.py" "$CONFIG" --launcher pytorch "$@" 2>&1 | tee "$LOG_FILE"
status=${PIPESTATUS[0]}
if [ "$status" -eq 2 ]; then usage; fi
exit "$status"
