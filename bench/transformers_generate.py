"""Hugging Face generate() tokens/s with attn_implementation="tunebench" against "sdpa", in one process, on one
random-weight model (from_config: no download, no network) that switches implementation between runs.

    python bench/transformers_generate.py                      # ~1B Llama, bf16, batch 1 and 8, prompt 512 and 2048
    python bench/transformers_generate.py --interpret --tiny   # CPU smoke check under the Triton interpreter

Greedy decoding of exactly --new tokens after each prompt (prefill included in the time). Each point is warmed up
once per implementation (Triton compiles, caches allocate), then timed --repeats times alternating the two; the
median counts. Token agreement compares the two greedy outputs position by position: with random weights and bf16,
a near-tie between the top two logits can flip one token, and greedy decoding then diverges for the rest of the row.
--tiny is a smoke check of the plumbing, not a measurement.

--check-logits separates a kernel error from a bf16 tie: sdpa's greedy tokens are fed back (teacher forcing, prefill
then one decode step per token through the KV cache) to models with attn_implementation "tunebench", "sdpa" and
"eager" in the benchmark's dtype and to a float64 copy ("sdpa"). Every model then sees the same tokens, so each
next-token logit can be held to the tolerance rule (tunebench.correctness.close_enough, sdpa's error the yardstick),
and the argmax disagreements of tunebench and of eager with sdpa can be counted side by side.
"""
import argparse
import json
import os
import statistics
import time

PRESETS = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=96, max_position_embeddings=256),
}
IMPLS = ("sdpa", "tunebench")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model, fp32, short prompts: a smoke check")
    p.add_argument("--interpret", action="store_true", help="run the kernels under the Triton interpreter (CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--check-logits", action="store_true",
                   help="teacher-forced next-token logits of tunebench, sdpa and eager against a float64 model, "
                        "at the first batch and prompt (see above)")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.prompt, args.new, args.repeats, args.dtype = [1, 2], [12], 4, 1, "float32"
    return args


def build_model(preset: str, dtype, device):
    """A random-weight Llama, built on the device (a 1B model initialises in seconds there, minutes on a CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    import tunebench.integrations.transformers  # noqa: F401  (registers "tunebench")
    torch.manual_seed(0)
    # initializer_range 0.2 spreads the logits, so that greedy picks are clear of ties (0.02 makes them near-uniform).
    config = LlamaConfig(**PRESETS[preset], initializer_range=0.2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def timed_generate(model, impl, ids, new) -> tuple[float, "torch.Tensor"]:
    import torch
    model.set_attn_implementation(impl)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - start, out[:, ids.shape[1]:]


def agreement(a, b) -> dict:
    """Share of equal tokens, rows equal in full, and the mean length of the equal prefix."""
    same = a == b
    prefix = [int(row.cumprod(0).sum()) for row in same.int()]
    return dict(agree=same.float().mean().item(), rows_equal=sum(p == a.shape[1] for p in prefix),
                mean_equal_prefix=statistics.mean(prefix))


def measure(model, batch, prompt, new, repeats, device, vocab) -> dict:
    import torch
    ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch * prompt)).to(device)
    tokens = {impl: timed_generate(model, impl, ids, new)[1] for impl in IMPLS}      # warm-up
    times = {impl: [] for impl in IMPLS}
    for r in range(repeats):
        for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
            times[impl].append(timed_generate(model, impl, ids, new)[0])
    row = dict(batch=batch, prompt=prompt, new=new)
    for impl in IMPLS:
        row[f"{impl}_s"] = statistics.median(times[impl])
        row[f"{impl}_tok_s"] = batch * new / row[f"{impl}_s"]
    row["speedup"] = row["sdpa_s"] / row["tunebench_s"]
    return row | agreement(tokens["tunebench"], tokens["sdpa"])


def check_logits(model, batch, prompt, new, device, vocab) -> dict:
    """Teacher-forced logits of each implementation against a float64 copy of the model (see the module docstring)."""
    import copy
    import torch
    from tunebench.correctness import close_enough
    from tunebench.integrations.transformers import teacher_forced_logits
    ids = torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch * prompt)).to(device)
    seq = timed_generate(model, "sdpa", ids, new)[1]
    seq = torch.cat([ids, seq], 1)
    reference = copy.deepcopy(model).double()
    reference.set_attn_implementation("sdpa")
    ref = teacher_forced_logits(reference, seq, prompt)
    logits = {}
    for impl in ("sdpa", "tunebench", "eager"):
        model.set_attn_implementation(impl)
        logits[impl] = teacher_forced_logits(model, seq, prompt)
    top2 = ref.topk(2, -1).values
    margin = top2[..., 0] - top2[..., 1]
    row = dict(batch=batch, prompt=prompt, new=new, positions=margin.numel(),
               ref_margin_median=margin.median().item())
    for impl, lg in logits.items():
        verdict = close_enough(lg, ref, logits["sdpa"])
        err = (lg.double() - ref).abs()
        row[impl] = dict(max_err=verdict.err, allowed=verdict.allowed, ok=verdict.ok,
                         argmax_vs_ref=(lg.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                         argmax_vs_sdpa=(lg.argmax(-1) == logits["sdpa"].argmax(-1)).float().mean().item(),
                         # a flip where float64's top two are further apart than twice this model's max error
                         clear_flips=int(((lg.argmax(-1) != ref.argmax(-1)) & (margin > 2 * err.amax(-1))).sum()))
        print(f"  {impl:>9}: max err {verdict.err:.3g} (allowed {verdict.allowed:.3g}, {'ok' if verdict.ok else 'FAIL'})"
              f"  argmax = float64's {row[impl]['argmax_vs_ref']:.1%}, = sdpa's {row[impl]['argmax_vs_sdpa']:.1%},"
              f" clear flips {row[impl]['clear_flips']}", flush=True)
    print(f"  float64 top-two margin: median {row['ref_margin_median']:.3g} over {row['positions']} positions")
    return row


def print_row(row: dict) -> None:
    print(f"{row['batch']:>5} {row['prompt']:>6} {row['new']:>4} {row['sdpa_tok_s']:>11.1f} "
          f"{row['tunebench_tok_s']:>15.1f} {row['speedup']:>7.2f}x {row['agree']:>7.1%} "
          f"{row['rows_equal']:>3}/{row['batch']:<3} {row['mean_equal_prefix']:>8.1f}", flush=True)


def main():
    args = parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"    # before anything imports triton's jit
    import torch
    import transformers
    import triton
    device = "cuda" if torch.cuda.is_available() and not args.interpret else "cpu"
    if device == "cpu" and not args.interpret:
        raise SystemExit("no CUDA GPU: pass --interpret (with --tiny) for a CPU smoke check")
    preset = "tiny" if args.tiny else "1b"
    model = build_model(preset, getattr(torch, args.dtype), device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter: not a measurement)"
    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}; "
          f"Llama {preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), {args.dtype}")
    print(f"{'batch':>5} {'prompt':>6} {'new':>4} {'sdpa tok/s':>11} {'tunebench tok/s':>15} {'speedup':>8} "
          f"{'agree':>7} {'rows eq':>7} {'eq prefix':>8}")
    rows, checks = [], []
    if args.check_logits:
        print(f"teacher-forced logits, batch {args.batch[0]}, prompt {args.prompt[0]}, {args.new} tokens:")
        checks.append(check_logits(model, args.batch[0], args.prompt[0], args.new, device,
                                   PRESETS[preset]["vocab_size"]))
    for batch in args.batch:
        for prompt in args.prompt:
            rows.append(measure(model, batch, prompt, args.new, args.repeats, device, PRESETS[preset]["vocab_size"]))
            print_row(rows[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                           transformers=transformers.__version__, preset=preset, dtype=args.dtype, rows=rows,
                           checks=checks), f,
                      indent=1)


if __name__ == "__main__":
    main()
