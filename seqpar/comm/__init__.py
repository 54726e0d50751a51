"""The communication layer: the only place that issues collectives."""

from seqpar.comm.communicator import (
    Communicator,
    MPICommunicator,
    PeerTimeout,
    RingComm,
    TorchCommunicator,
    get_communicator,
    install_mpi_abort_hook,
    job_store,
    set_timeout,
    timeout_s,
)

__all__ = [
    "Communicator", "MPICommunicator", "PeerTimeout", "RingComm", "TorchCommunicator", "get_communicator",
    "install_mpi_abort_hook", "job_store", "set_timeout", "timeout_s",
]
