"""Compiles flash_v3 launches (and, through compile_for, any Triton or Gluon kernel's) for sm_90a (Hopper) on a machine
without a GPU: Triton lowers them to PTX and its bundled ptxas assembles the cubin, which catches syntax, layout,
type and shared-memory errors. Nothing runs.

The compiles run in a child process without TRITON_INTERPRET: under the interpreter (which tests/conftest.py switches
on without a GPU), triton 3.6 builds its standard library (tl.max, tl.sum, cdiv, which Gluon re-exports) as
interpreted functions, which the Gluon compiler refuses. `compile_for` follows what triton 3.6's JITFunction.run does
before compiling (bind and specialize the arguments, pack the options), with the target given instead of read from
the driver."""
import json
import os
import subprocess
import sys

CHILD_TIMEOUT_S = 900


def compile_cases(cases: list[dict]) -> list[dict]:
    """Compiles each case {config, D, dtype, causal, B, Hq, Hkv, Nq, Nk} in a child process; returns per case
    {ok, error, shared, ptx_target, warp_specialized, wgmma_notes}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], input=json.dumps(cases), capture_output=True, text=True,
                           env=env, timeout=CHILD_TIMEOUT_S)
    if child.returncode:
        raise RuntimeError(f"the sm_90 compile process failed ({child.returncode}):\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def compile_for(kernel, args, options, target=None):
    """The CompiledKernel of kernel(*args, **options) for target (default sm_90a; the cubin in .asm['cubin'])."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    from triton.runtime.jit import create_function_from_signature
    target = target or GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, parsed = binder(*args, **options)
    parsed, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, parsed)
    source = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource      # Gluon or Triton kernel
    return triton.compile(source(kernel, signature, constexprs, attrs), target=target, options=parsed.__dict__)


def _compile_case(case: dict) -> dict:
    import torch
    from tunebench.kernels import flash_v3
    dtype = getattr(torch, case["dtype"])
    q = torch.empty(case["B"], case["Hq"], case["Nq"], case["D"], dtype=dtype)
    k, v = (torch.empty(case["B"], case["Hkv"], case["Nk"], case["D"], dtype=dtype) for _ in range(2))
    kernel, _, args, options = flash_v3._arguments(q, k, v, torch.empty_like(q), case["config"], case["causal"], None)
    try:
        compiled = compile_for(kernel, args, options)
    except Exception as e:                                # noqa: BLE001 - reported per case, the test asserts
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    return {"ok": bool(compiled.asm.get("cubin")), "error": "", "shared": compiled.metadata.shared,
            "ptx_target": ".target sm_90a" in compiled.asm["ptx"],
            "warp_specialized": "ttg.warp_specialize" in compiled.asm["ttgir"],
            "wgmma_notes": wgmma_notes(compiled.asm["ptx"])}


# ptxas's notes that a kernel's wgmma pipeline is not what its source says: C7514 (wgmma.mma_async serialized: other
# instructions read a wgmma's accumulator before its wait) and C7517 (a warpgroup.wait injected, so that registers a
# wgmma defines can be used). flash_v3's first OVERLAP schedule drew both, in every build.
WGMMA_NOTES = ("C7514", "C7517")


def wgmma_notes(ptx: str) -> list[str]:
    """The WGMMA_NOTES that the bundled ptxas prints for this PTX (sm_90a, -v), each as ptxas words it."""
    import tempfile
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True, timeout=300)
    return [line.strip() for line in done.stderr.splitlines() if any(code in line for code in WGMMA_NOTES)]


if __name__ == "__main__":
    print(json.dumps([_compile_case(case) for case in json.loads(sys.stdin.read())]))
