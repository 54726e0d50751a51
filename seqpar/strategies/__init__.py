"""Sequence-parallel strategies: each file is one algorithm with its exact forward and backward."""
