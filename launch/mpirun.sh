#!/usr/bin/env bash
# Start seqpar -- or any script -- under MPI: MPICH's mpiexec (the `mpich` wheel of `pip install -e ".[mpi]"`)
# or Open MPI's mpirun, detected from `$MPIEXEC --version`.
#
#   launch/mpirun.sh                                    # seqpar run $CONFIG (default: configs/mpi.toml)
#   launch/mpirun.sh configs/mpi.toml --seq-len 4096    # a .toml first: seqpar run that config, flags after it
#   launch/mpirun.sh verify --group mpi --seq-lens 61   # a seqpar command first: run | verify | bench | info | serve
#   launch/mpirun.sh examples/train_recall.py --steps 5        # a .py file first: that script on every rank
#   HOSTS=node0,node1 NP=16 launch/mpirun.sh            # several hosts
#
# Convention (the same as launch/torchrun.sh): the FIRST argument says what runs; the rest passes through.
# Python runs as `python -m mpi4py ...` (mpi4py's documented way): an uncaught exception on one rank aborts
# the whole job (MPI_Abort) instead of leaving the other ranks waiting in their next collective.
# Ranks join one job through seqpar.init_distributed (mpi4py broadcasts rank 0's address and a free port,
# then gloo), or talk through mpi4py directly with run.group = "mpi".
#
# Environment (defaults):
#   NP               ranks (2)                    MPIEXEC      the launcher (mpiexec)
#   HOSTS            comma-separated hosts        HOSTFILE     a host file (MPICH -f, Open MPI --hostfile)
#   OMP_NUM_THREADS  CPU threads per rank (1; passed to every rank: -genv for MPICH, -x for Open MPI)
#   CONFIG           config for `seqpar run` (configs/mpi.toml)
#   PYTHON           interpreter (the `python` on PATH here, as an absolute path: a launcher that is itself a
#                    shim -- pyenv's mpiexec -- may change PATH for the ranks)     MPI_ARGS  extra launcher flags
#   DRY_RUN=1        print the command instead of running it
set -euo pipefail

PYTHON=${PYTHON:-$(command -v python || echo python)}
NP=${NP:-2}
MPIEXEC=${MPIEXEC:-mpiexec}
CONFIG=${CONFIG:-configs/mpi.toml}
THREADS=${OMP_NUM_THREADS:-1}

first=${1:-}
case "$first" in
  "")                       target=(-m seqpar_tools run "$CONFIG") ;;
  *.toml)                   shift; target=(-m seqpar_tools run "$first" "$@") ;;
  run|verify|bench|info|serve) shift; target=(-m seqpar_tools "$first" "$@") ;;
  *.py)                     shift; target=("$first" "$@") ;;
  *) echo "launch/mpirun.sh: first argument '$first' is not a *.toml, a seqpar command (run|verify|bench|info|serve)" \
          "or a *.py script; see the top of this file" >&2; exit 2 ;;
esac

version=$("$MPIEXEC" --version 2>&1 || true)
if grep -qiE "open ?mpi|openrte|prte" <<<"$version"; then
  flavour=openmpi
  args=(-np "$NP" -x OMP_NUM_THREADS="$THREADS" -x PATH -x PYTHONPATH)
  [[ "$(id -u)" == 0 ]] && args+=(--allow-run-as-root)
  [[ -n "${HOSTS:-}" ]] && args+=(--host "$HOSTS")
  [[ -n "${HOSTFILE:-}" ]] && args+=(--hostfile "$HOSTFILE")
else  # MPICH / Hydra (also Intel MPI, MVAPICH)
  flavour=mpich
  args=(-n "$NP" -genv OMP_NUM_THREADS "$THREADS")
  [[ -n "${HOSTS:-}" ]] && args+=(-hosts "$HOSTS")
  [[ -n "${HOSTFILE:-}" ]] && args+=(-f "$HOSTFILE")
fi

# shellcheck disable=SC2206  # MPI_ARGS is split on spaces on purpose
cmd=("$MPIEXEC" "${args[@]}" ${MPI_ARGS:-} "$PYTHON" -m mpi4py "${target[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "# $flavour"
  echo "${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
