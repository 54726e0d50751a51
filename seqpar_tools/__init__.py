"""seqpar's tool layer: the ``seqpar`` command (run, verify, bench, info), configs, reports and the rank runner.

The library (``seqpar``) imports nothing from here.
"""
