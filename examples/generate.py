"""Greedy generation with a small random decoder-only transformer, through tunebench end to end.

- prefill: tunebench.flash_attention (causal) over the prompt;
- decode: tunebench.paged_attention over a paged KV cache managed by tunebench.BlockAllocator, new K/V written by
  the cache-write kernel;
- n parallel samples share the prompt's blocks through fork(); sample i starts from the i-th most likely first token
  and then decodes greedily, so the samples diverge and copy-on-write runs when they do.

A dense reference (plain PyTorch SDPA over a contiguous per-sample cache) generates the same tokens:
`run(...)` returns both. Random weights, seeded; nothing is downloaded.

With `--kv-dtype fp8` the paged cache holds float8_e4m3fn with one scale per layer and KV head, taken from the
prompt's K/V amax at prefill (scale = amax / 448; later tokens beyond it saturate). The dense reference then attends
over the same quantised-then-dequantised values, so tunebench must still match it token for token; and the same
prompt is generated a second time on a cache in the model's dtype, to count how many greedy tokens fp8 changes.

    python examples/generate.py                # GPU: float32 token-for-token check, plus tokens/s
    TRITON_INTERPRET=1 python examples/generate.py --small    # CPU, under the Triton interpreter
    python examples/generate.py --record shapes.json            # then: tunebench tune --from-record shapes.json
    python examples/generate.py --dtype bfloat16 --kv-dtype fp8   # fp8 cache vs a bf16 cache, same prompt
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tunebench
import tunebench.reference as ref
from tunebench.kernels import cache_write

FP8 = torch.float8_e4m3fn


def fp8_scales(x: torch.Tensor) -> torch.Tensor:
    """One float32 scale per KV head of x [T, Hkv, D]: its amax over the tokens maps onto e4m3's largest value."""
    return (x.float().abs().amax(dim=(0, 2)).clamp_min(1e-6) / torch.finfo(FP8).max).contiguous()


@dataclass(frozen=True)
class ModelConfig:
    layers: int = 4
    hidden: int = 512
    Hq: int = 8
    Hkv: int = 2
    D: int = 64
    vocab: int = 1024


SMALL = ModelConfig(layers=2, hidden=64, Hq=4, Hkv=2, D=16, vocab=128)


class TinyLM:
    """Pre-norm decoder blocks (RMSNorm, GQA attention, GELU MLP) with seeded random weights and a tied LM head."""

    def __init__(self, cfg: ModelConfig, device, dtype=torch.float32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.cfg, self.device, self.dtype = cfg, device, dtype

        def w(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

        h, qd, kd = cfg.hidden, cfg.Hq * cfg.D, cfg.Hkv * cfg.D
        self.embed = w(cfg.vocab, h, scale=1.0)
        self.layers = [dict(wq=w(h, qd, scale=h ** -0.5), wk=w(h, kd, scale=h ** -0.5), wv=w(h, kd, scale=h ** -0.5),
                            wo=w(qd, h, scale=qd ** -0.5), w1=w(h, 4 * h, scale=h ** -0.5),
                            w2=w(4 * h, h, scale=(4 * h) ** -0.5)) for _ in range(cfg.layers)]

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, tokens: torch.Tensor, attend) -> torch.Tensor:
        """tokens [T] (one new token per sequence when decoding, or a whole prompt) -> logits [T, vocab].
        attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D] does the attention and cache work."""
        c = self.cfg
        x = self.embed[tokens]
        for i, lw in enumerate(self.layers):
            a = self._norm(x)
            q = (a @ lw["wq"]).view(-1, c.Hq, c.D)
            k = (a @ lw["wk"]).view(-1, c.Hkv, c.D)
            v = (a @ lw["wv"]).view(-1, c.Hkv, c.D)
            x = x + attend(i, q, k, v).reshape(-1, c.Hq * c.D) @ lw["wo"]
            x = x + F.gelu(self._norm(x) @ lw["w1"]) @ lw["w2"]
        # Sharp logits (x 8): greedy choices are then far from ties, so two correct attention paths agree.
        return 8.0 * self._norm(x) @ self.embed.T


class PagedRunner:
    """Generation through tunebench: flash_attention prefill, paged decode, shared prompt blocks."""

    def __init__(self, model: TinyLM, num_blocks: int, block_size: int | None = None, fp8: bool = False):
        c = model.cfg
        self.model, self.fp8 = model, fp8
        self.alloc = tunebench.BlockAllocator(num_blocks, block_size, kv_heads=c.Hkv, head_dim=c.D,
                                              dtype=str(model.dtype).removeprefix("torch."))
        shape = (num_blocks, self.alloc.block_size, c.Hkv, c.D)
        cache_dtype = FP8 if fp8 else model.dtype
        self.k_cache = [torch.randn(shape, device=model.device).to(cache_dtype) for _ in range(c.layers)]
        self.v_cache = [torch.randn(shape, device=model.device).to(cache_dtype) for _ in range(c.layers)]
        self.scales: list[dict] = [{} for _ in range(c.layers)]     # fp8: k_scale, v_scale per layer, set at prefill

    def _write(self, layer, k, v, slots):
        if self.fp8 and not self.scales[layer]:
            self.scales[layer] = dict(k_scale=fp8_scales(k), v_scale=fp8_scales(v))
        cache_write.launch(k, v, self.k_cache[layer], self.v_cache[layer], slots, **self.scales[layer])

    def prefill(self, seq, prompt: torch.Tensor) -> torch.Tensor:
        slots = torch.tensor(self.alloc.allocate(seq, len(prompt)), dtype=torch.int64, device=self.model.device)

        def attend(layer, q, k, v):
            self._write(layer, k, v, slots)
            # [T, H, D] -> [1, H, T, D] views: no copy, the kernels take any strides.
            out = tunebench.flash_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                            v.transpose(0, 1)[None], causal=True)
            return out[0].transpose(0, 1)

        return self.model.forward(prompt, attend)[-1]

    def decode(self, seqs: list, tokens: torch.Tensor) -> torch.Tensor:
        dev = self.model.device
        slots = torch.tensor([self.alloc.append(s) for s in seqs], dtype=torch.int64, device=dev)
        copies = self.alloc.take_copies()
        if copies:
            src, dst = (torch.tensor(c, device=dev) for c in zip(*copies))
            for cache in self.k_cache + self.v_cache:
                cache[dst] = cache[src]
        tables = self.alloc.block_tables(seqs, device=dev)
        lens = self.alloc.context_lens(seqs, device=dev)

        def attend(layer, q, k, v):
            self._write(layer, k, v, slots)
            return tunebench.paged_attention(q, self.k_cache[layer], self.v_cache[layer], tables, lens,
                                             **self.scales[layer])

        return self.model.forward(tokens, attend)


class DenseRunner:
    """The reference: plain SDPA over a contiguous cache per sample, no tunebench. With fp8, the cache keeps the
    e4m3 round trip of each K/V (reference quantiser, the paged run's scales); prefill attends to the exact values,
    as the paged run's flash_attention does."""

    def __init__(self, model: TinyLM, fp8: bool = False):
        self.model, self.fp8 = model, fp8
        self.cache: dict = {}          # seq -> per layer [k [Hkv, T, D], v [Hkv, T, D]]
        self.scales: list = [None] * len(model.layers)

    def _stored(self, layer, k, v):
        if not self.fp8:
            return k, v
        if self.scales[layer] is None:
            self.scales[layer] = (fp8_scales(k), fp8_scales(v))
        return tuple(ref.dequantize_fp8(ref.quantize_fp8(x, s, FP8), s, x.dtype)
                     for x, s in zip((k, v), self.scales[layer]))

    def _attend_one(self, seq, layer, q, k, v, causal):
        kv = self.cache.setdefault(seq, [[None, None] for _ in self.model.layers])[layer]
        prefill = kv[0] is None
        ks, vs = (t.transpose(0, 1) for t in self._stored(layer, k, v))
        kv[0] = ks if prefill else torch.cat([kv[0], ks], 1)
        kv[1] = vs if prefill else torch.cat([kv[1], vs], 1)
        keys, values = (k.transpose(0, 1), v.transpose(0, 1)) if prefill else kv
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], is_causal=causal,
                                              enable_gqa=True)[0].transpose(0, 1)

    def prefill(self, seq, prompt):
        return self.model.forward(prompt, lambda i, q, k, v: self._attend_one(seq, i, q, k, v, True))[-1]

    def fork(self, parent, child):
        self.cache[child] = [[k, v] for k, v in self.cache[parent]]

    def decode(self, seqs, tokens):
        def attend(layer, q, k, v):
            return torch.cat([self._attend_one(s, layer, q[i:i + 1], k[i:i + 1], v[i:i + 1], False)
                              for i, s in enumerate(seqs)])
        return self.model.forward(tokens, attend)


def generate(runner, prompt: torch.Tensor, n: int, steps: int, fork) -> list[list[int]]:
    """n samples: sample i takes the i-th most likely first token, then decodes greedily."""
    first = runner.prefill(0, prompt).topk(n).indices
    for i in range(1, n):
        fork(0, i)
    seqs, tokens = list(range(n)), first
    out = [[int(t)] for t in first]
    for _ in range(steps - 1):
        tokens = runner.decode(seqs, tokens).argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            out[i].append(t)
    return out


def run(cfg: ModelConfig = ModelConfig(), prompt_len: int = 100, n: int = 4, steps: int = 32, device=None,
        dtype=torch.float32, num_blocks: int = 256, block_size: int | None = None, seed: int = 0,
        record: str | None = None, kv_dtype: str | None = None) -> dict:
    """Generates with tunebench and with the dense reference. ``record``: a file that tunebench.record() writes the
    tunebench calls' buckets to (the reference makes none). ``kv_dtype="fp8"``: an e4m3 paged cache; then also
    ``baseline`` (the tokens of the same run on a cache in ``dtype``) and ``agree`` (how many of them fp8 kept)."""
    if kv_dtype not in (None, "fp8"):
        raise ValueError(f"kv_dtype must be None (the model's dtype) or 'fp8', got {kv_dtype!r}")
    fp8 = kv_dtype == "fp8"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = TinyLM(cfg, device, dtype, seed)
    prompt = torch.randint(0, cfg.vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed)).to(device)
    paged = PagedRunner(model, num_blocks, block_size, fp8)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with tunebench.record(record) if record else contextlib.nullcontext():
        tokens = generate(paged, prompt, n, steps, paged.alloc.fork)
    sync()
    seconds = time.perf_counter() - t0
    stats = paged.alloc.stats()
    dense = DenseRunner(model, fp8)
    expected = generate(dense, prompt, n, steps, dense.fork)
    result = dict(tokens=tokens, expected=expected, seconds=seconds, tokens_per_s=n * steps / seconds, stats=stats,
                  block_size=paged.alloc.block_size, block_size_source=paged.alloc.block_size_source)
    if fp8:
        plain = PagedRunner(model, num_blocks, block_size)
        result["baseline"] = generate(plain, prompt, n, steps, plain.alloc.fork)
        result["agree"] = sum(a == b for x, y in zip(tokens, result["baseline"]) for a, b in zip(x, y))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny model that the CPU interpreter runs in seconds")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens")
    p.add_argument("--steps", type=int, default=None, help="tokens generated per sample")
    p.add_argument("-n", type=int, default=4, help="parallel samples sharing the prompt")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="float32 makes the token-for-token comparison with the dense reference meaningful")
    p.add_argument("--kv-dtype", choices=("auto", "fp8"), default="auto",
                   help="auto: the paged cache in --dtype; fp8: float8_e4m3fn with per-head scales from the prompt's "
                        "K/V amax, compared with the same prompt on an --dtype cache")
    p.add_argument("--record", default=None, metavar="FILE",
                   help="write the buckets of every tunebench call to FILE (tune them: tunebench tune --from-record)")
    args = p.parse_args(argv)
    cfg = SMALL if args.small else ModelConfig()
    r = run(cfg, args.prompt or (40 if args.small else 200), args.n, args.steps or (8 if args.small else 64),
            dtype=getattr(torch, args.dtype), record=args.record, kv_dtype=None if args.kv_dtype == "auto" else "fp8")
    s = r["stats"]
    print(f"block size {r['block_size']} ({r['block_size_source']})")
    print(f"{args.n} samples x {len(r['tokens'][0])} tokens in {r['seconds']:.3f} s: {r['tokens_per_s']:.1f} tokens/s "
          f"(wall clock, first calls include compilation)")
    print(f"blocks used {s.used_blocks} vs {s.unshared_blocks} unshared ({s.saved_pct:.1f}% saved by sharing); "
          f"waste in last blocks {s.waste_pct:.1f}%")
    same = r["tokens"] == r["expected"]
    print(f"tokens equal to the dense SDPA reference{' on the same fp8 values' if 'agree' in r else ''}: {same}")
    if "agree" in r:
        total = sum(len(t) for t in r["tokens"])
        diverged = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                    for x, y in zip(r["tokens"], r["baseline"])]
        print(f"fp8 e4m3 cache vs a {args.dtype} cache, same prompt: {r['agree']} of {total} greedy tokens agree "
              f"({100 * r['agree'] / total:.1f}%); first differing token per sample: {diverged}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
