"""``seqpar serve``: the attention service (README: "The attention service").

- :mod:`.engine`   the sessions / arenas every rank holds, and the ops of a step (the same on every rank);
- :mod:`.service`  one rank of the service: rank 0 answers HTTP (aiohttp, in a thread) and the tensor door,
                   batches requests into steps and broadcasts them; every rank applies them; heartbeats, drain,
                   abort;
- :mod:`.door`     the tensor door: a ZeroMQ socket for appends and attends that rank 0's step loop reads itself;
- :mod:`.command`  the ``seqpar serve`` command: spawn local ranks or join torchrun / mpirun.

The client is :mod:`seqpar.client` (the library; it imports nothing from here).
"""
