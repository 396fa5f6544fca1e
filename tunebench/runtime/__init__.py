"""What runs at inference time, reading what tuning stored: the dispatcher (a call's shape -> its bucket -> the tuned
config -> launch), the paged KV block allocator, and KV cache sizing.

Importing this package imports nothing: `tunebench.flash_attention` loads dispatch.py (and torch) on first use, and
the allocator stays free of torch until it builds tensors.
"""
