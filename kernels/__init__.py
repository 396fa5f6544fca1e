"""Triton attention kernels, one per file. Each module exposes launch, SPACE, keep and DEFAULT; _launch holds the
checks and helpers they share.

These modules import only torch and triton, never tunebench.
"""
