"""A worker entry point (a Fleet's or Worker's ``serve``) that reports what its process holds instead of running
trials, for tests/test_startup.py: which heavy modules it found already imported (a forkserver's preload), the
environment it runs in, and how torch and triton read it."""
import os
import sys

HEAVY = ("torch", "triton.language", "tunebench.tune.worker")


def probe(conn, role, interpret, visible_device, threads, name=""):
    preloaded = [m for m in HEAVY if m in sys.modules]
    import torch
    import triton
    import triton.language as tl

    from tunebench.tune.serving import reply, serve_requests
    facts = {"pid": os.getpid(), "preloaded": preloaded,
             "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "interpret_knob": triton.knobs.runtime.interpret,
             "tl_max": type(tl.max).__name__,  # InterpretedFunction where triton.language was imported interpreting
             "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "torch_visible": torch.cuda._parse_visible_devices(),  # what CUDA's initialisation will read
             "cuda_initialized": torch.cuda.is_initialized(), "marker": os.environ.get("TUNEBENCH_PROBE_MARKER")}
    if reply(conn, ("ready", os.getpid())):
        serve_requests(conn, lambda request: (("ok", facts), False))
