"""The communication layer: the only place that issues collectives."""

from seqpar.comm.communicator import (
    Communicator,
    MPICommunicator,
    RingComm,
    TorchCommunicator,
    get_communicator,
)

__all__ = ["Communicator", "MPICommunicator", "RingComm", "TorchCommunicator", "get_communicator"]
