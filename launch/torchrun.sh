#!/usr/bin/env bash
# Start seqpar (python -m seqpar_tools = the seqpar command) -- or any script -- under torchrun, on one node or many.
#
#   launch/torchrun.sh                                  # seqpar run $CONFIG (default: the built-in config)
#   launch/torchrun.sh configs/gpu.toml --repeats 5     # a .toml first: seqpar run that config, flags after it
#   launch/torchrun.sh verify --seq-lens 61             # a seqpar command first: run | verify | bench | info | serve
#   launch/torchrun.sh serve configs/serve.toml         # the attention service: rank 0 serves HTTP
#   launch/torchrun.sh examples/train_recall.py --steps 5      # a .py file first: that script on every rank
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh       # on every node: multi-node, c10d rendezvous
#
# Convention: the FIRST argument says what runs (nothing / *.toml / a seqpar command / *.py); every argument
# after it is passed through unchanged. Anything else first is an error (use `run --flag`, not `--flag`).
#
# Environment (defaults):
#   NPROC        ranks per node (the number of GPUs, else 2); seqpar run uses the launcher's world size
#   NNODES       nodes (1: torchrun --standalone, a free local port; >1: c10d rendezvous at MASTER_ADDR:MASTER_PORT)
#   NODE_RANK    this node's index, used by RDZV_BACKEND=static (SLURM_NODEID, else 0)
#   MASTER_ADDR  rendezvous host (127.0.0.1)          MASTER_PORT  rendezvous port (29500)
#   RDZV_BACKEND c10d | static (c10d)                 RDZV_ID      job id shared by all nodes (SLURM_JOB_ID, else seqpar)
#   CONFIG       config for `seqpar run` (empty: the built-in default = configs/default.toml)
#   OMP_NUM_THREADS  CPU threads per rank (1)          PYTHON       interpreter (python)
#   TORCHRUN_ARGS    extra torchrun flags              DRY_RUN=1    print the command instead of running it
set -euo pipefail

PYTHON=${PYTHON:-python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)' 2>/dev/null || echo 2)
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-seqpar}}
CONFIG=${CONFIG:-}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# what runs: torchrun's target and its arguments
first=${1:-}
case "$first" in
  "")                       target=(-m seqpar_tools run ${CONFIG:+"$CONFIG"}) ;;
  *.toml)                   shift; target=(-m seqpar_tools run "$first" "$@") ;;
  run|verify|bench|info|serve) shift; target=(-m seqpar_tools "$first" "$@") ;;
  *.py)                     shift; target=("$first" "$@") ;;
  *) echo "launch/torchrun.sh: first argument '$first' is not a *.toml, a seqpar command (run|verify|bench|info|serve)" \
          "or a *.py script; see the top of this file" >&2; exit 2 ;;
esac

if [[ "$NNODES" == 1 ]]; then
  nodes=(--standalone --nnodes=1)
elif [[ "$RDZV_BACKEND" == static ]]; then
  nodes=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
else
  nodes=(--nnodes="$NNODES" --rdzv-backend="$RDZV_BACKEND" --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
         --rdzv-id="$RDZV_ID")
fi

# shellcheck disable=SC2206  # TORCHRUN_ARGS is split on spaces on purpose
cmd=("$PYTHON" -m torch.distributed.run "${nodes[@]}" --nproc-per-node="$NPROC" ${TORCHRUN_ARGS:-} "${target[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
