"""The paged kernels compiled for sm_90a (Hopper) on a machine without a GPU (tests/sm90.py's compile_for): each
launch of the checked (SAFE, CHECK) and unchecked variants is recorded instead of run, then lowered to PTX and
assembled by Triton's bundled ptxas, which catches what the interpreter does not (types, layouts, the flag stores).
Nothing runs."""
import json
import os
import subprocess
import sys

# (kernel module, launch keyword arguments): the split decode (decode + reduce), prefill and cache_write, each checked;
# the decode also on an e4m3 cache with and without RESTAGE_V (its inline assembly is compiled only here and on a GPU).
CASES = [("paged_attention", dict(check=True)), ("paged_attention", dict(_safe=False)),
         ("paged_attention", dict(check=True, fp8=1)), ("paged_attention", dict(fp8=0)),
         ("paged_prefill", dict(check=True, check_values=False)), ("cache_write", dict(check=True))]


def test_paged_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in results] == (["_paged_decode", "_paged_reduce"] * 2 + ["_paged_decode"] * 2
                                              + ["_paged_prefill", "_cache_write"])
    for r in results:
        assert r["ok"], r
    # RESTAGE_V's point, which a Triton upgrade could undo silently (it would still be correct, only slower): the fp8
    # V tile reaches the P V dot through a 16-bit restage, not one byte per shared-memory load. Without it, byte loads.
    restaged, plain = results[4]["byte_loads"], results[5]["byte_loads"]
    assert restaged == 0 and plain > 0, (restaged, plain)


class _Recorder:
    """Stands in for a jit kernel: kernel[grid](*args) records (kernel, args, options) and launches nothing."""

    def __init__(self, jit, log):
        self.jit, self.log = jit, log

    def __getitem__(self, grid):
        return lambda *args, **options: self.log.append((self.jit, args, options))


JITS = {"paged_attention": ("_paged_decode", "_paged_reduce"), "paged_prefill": ("_paged_prefill",),
        "cache_write": ("_cache_write",)}


def _launches() -> list:
    import torch
    from tunebench.kernels import cache_write, paged_attention, paged_prefill
    log = []
    for module in (paged_attention, paged_prefill, cache_write):
        module.check_runnable = lambda *a: None                      # CPU tensors stand in for the GPU's
        for name in JITS[module.__name__.rsplit(".", 1)[1]]:
            setattr(module, name, _Recorder(getattr(module, name), log))
    paged_attention.raise_paged_errors = paged_prefill.raise_paged_errors = lambda *a: None
    paged_attention.interpreting = lambda: False                      # compile the GPU's code, inline assembly included
    cache_write._raise_slot_errors = lambda *a: None
    B, Hq, Hkv, D, page, dt = 4, 32, 8, 128, 16, torch.bfloat16
    cache = torch.empty(64, page, Hkv, D, dtype=dt)
    tables, lens = torch.zeros(B, 8, dtype=torch.int32), torch.zeros(B, dtype=torch.int32)
    for kernel, options in CASES:
        if kernel == "paged_attention" and "fp8" in options:
            options = dict(options)
            # No split: a partition of one tile would let the compiler drop the loop whose instructions are counted.
            config = dict(paged_attention.DEFAULT, BLOCK_N=64, PARTITION=0, RESTAGE_V=options.pop("fp8"))
            fp8 = cache.to(torch.float8_e4m3fn)
            paged_attention.launch(torch.empty(B, Hq, D, dtype=dt), fp8, fp8, tables, lens, config, k_scale=0.5,
                                   v_scale=torch.ones(Hkv), **options)
        elif kernel == "paged_attention":
            config = dict(paged_attention.DEFAULT, BLOCK_N=64, PARTITION=64)     # a tile spans pages; split
            paged_attention.launch(torch.empty(B, Hq, D, dtype=dt), cache, cache, tables, lens, config, **options)
        elif kernel == "paged_prefill":
            cu = torch.zeros(B + 1, dtype=torch.int32)
            paged_prefill.launch(torch.empty(10, Hq, D, dtype=dt), cache, cache, tables, cu, lens, **options)
        else:
            new = torch.empty(3, Hkv, D, dtype=dt)
            cache_write.launch(new, new, cache, cache, torch.zeros(3, dtype=torch.int32), **options)
    return log


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    from sm90 import compile_for
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from paged_sass import loop_profile
    results = []
    for jit, args, options in _launches():
        byte_loads = None
        try:
            cubin = compile_for(jit, args, options).asm.get("cubin")
            ok, error = bool(cubin), ""
            if ok and options.get("KV_FP8"):
                byte_loads = loop_profile(cubin, suffixes=True)[1]["LDS.U8"]
        except Exception as e:                                # noqa: BLE001 - reported per kernel, the test asserts
            ok, error = False, f"{type(e).__name__}: {str(e)[-2000:]}"
        results.append({"kernel": jit.fn.__name__, "options": {k: v for k, v in options.items()
                                                                 if k in ("SAFE", "CHECK")}, "ok": ok, "error": error,
                        "byte_loads": byte_loads})
    print(json.dumps(results))
