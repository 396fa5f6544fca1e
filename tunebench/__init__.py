"""tunebench: tuned Triton attention kernels and the harness that tunes and checks them.

Importing this module stays light: no optuna, sqlalchemy or hypothesis.
"""
__version__ = "0.1.0"
