"""Triton attention kernels, one per file. Each module exposes launch, SPACE, keep and DEFAULT.

These modules import only torch and triton, never tunebench.
"""
