# seqpar on an official PyTorch CUDA image, with the MPI extra (mpi4py + the mpich wheel's mpiexec).
#
#   docker build -t seqpar .
#   docker run --rm --gpus all seqpar                                    # seqpar info
#   docker run --rm --gpus all --ipc=host -v "$PWD/out:/out" seqpar seqpar run configs/gpu.toml --out /out
#   # multi-node: on every node (host network, so the rendezvous and NCCL see the real interfaces)
#   docker run --rm --gpus all --ipc=host --network=host -e NNODES=2 -e MASTER_ADDR=node0 seqpar \
#       launch/torchrun.sh configs/multinode.toml
#
# The base image brings torch (it satisfies pyproject's torch requirement, so pip keeps it) and Python 3.11.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

# requires-python of pyproject.toml, checked at build time (tests/test_docker.py keeps the two equal)
RUN python -c 'import sys; assert sys.version_info >= (3, 10), sys.version'

WORKDIR /opt/seqpar
COPY pyproject.toml README.md ./
COPY seqpar ./seqpar
COPY seqpar_tools ./seqpar_tools
RUN pip install --no-cache-dir ".[mpi]" && python -c "import seqpar, mpi4py"
COPY configs ./configs
COPY launch ./launch

CMD ["seqpar", "info"]
