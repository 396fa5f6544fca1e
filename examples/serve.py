"""Continuous batching end to end: a small scheduler in the style of nano-vllm serves the random-weight model of
examples/generate.py from one paged KV cache, every step's attention through tunebench's tuned dispatcher.

- Requests share system prompts (64 requests over one 1k-token prompt by default) and all wait in a queue at time 0.
- Each step has a token budget. Running sequences come first: a decode row takes one token, an unfinished prompt its
  next chunk; waiting requests are then admitted with what is left, so long prompts are prefilled in chunks.
- A step's new tokens (decode rows and prefill chunks mixed) go through one `tunebench.paged_prefill` launch per layer:
  bottom-right causal over the paged cache. A step of decode rows only goes through `tunebench.paged_attention`
  (split-K). The new K/V are written first by the cache-write kernel. The block tables, cu_seqlens_q and context_lens
  are built once per step and reused by every layer.
- Admission allocates blocks for all of a request's tokens. A decode row that finds no free block preempts the most
  recently admitted running sequence: its blocks are freed, and it goes back to the front of the queue, to be
  recomputed later (prompt plus the tokens generated so far; those tokens are kept).
- With prefix caching the allocator shares the cached full blocks of a prompt's prefix, and computing starts after
  them (KVPool is the one place that speaks that API). A block enters the cache once its K/V is computed: requests
  admitted in the same step as the first one to hold a system prompt do not find it.

Every request's tokens are checked against generate.py's dense reference (SDPA over a contiguous cache per request,
greedy); the script exits 1 if any differs. Random weights, seeded; nothing is downloaded.

    python examples/serve.py                                  # GPU: without, then with prefix caching
    TRITON_INTERPRET=1 python examples/serve.py --small       # CPU, under the Triton interpreter
    python examples/serve.py --num-blocks 300 --block-size 16   # a tight pool: preemption
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

import tunebench
from tunebench.kernels import cache_write

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from generate import SMALL, DenseRunner, ModelConfig, TinyLM  # noqa: E402

# The cache write is not dispatched: its DEFAULT takes one token per program, made for decode. A step writes a chunk
# of prompt tokens too, so 16 per program (in cache_write.SPACE).
WRITE_CONFIG = {"BLOCK_T": 16, "num_warps": 1}


@dataclass(frozen=True)
class Request:
    rid: int
    prompt: list[int]
    max_tokens: int
    system_len: int = 0     # leading prompt tokens shared with other requests

    def __post_init__(self):
        if not self.prompt or self.max_tokens < 1:
            raise ValueError(f"request {self.rid}: needs a prompt of >= 1 token and max_tokens >= 1, got "
                             f"{len(self.prompt)} and {self.max_tokens}")


@dataclass(eq=False)
class Sequence:
    request: Request
    tokens: list[int] = field(init=False)     # the prompt, then the generated tokens
    computed: int = 0           # leading tokens whose K/V the cache holds
    first_hit: int | None = None    # tokens found cached at the first admission
    first_token_s: float | None = None
    chunks: int = 0             # steps that ran part of the prompt

    def __post_init__(self):
        self.tokens = list(self.request.prompt)

    @property
    def rid(self) -> int:
        return self.request.rid

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.computed

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]

    @property
    def done(self) -> bool:
        return len(self.generated) == self.request.max_tokens


def make_requests(vocab: int, n: int, system_len: int, systems: int = 1, suffix=(8, 64), max_tokens=(16, 64),
                  seed: int = 0) -> list[Request]:
    """n requests; request i starts with system prompt i % systems, then a suffix of its own. Lengths are drawn
    uniformly from the inclusive ranges."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (), generator=g))

    prompts = [torch.randint(0, vocab, (system_len,), generator=g).tolist() for _ in range(systems)]
    return [Request(i, prompts[i % systems] + torch.randint(0, vocab, (draw(*suffix),), generator=g).tolist(),
                    draw(*max_tokens), system_len) for i in range(n)]


class KVPool:
    """The block allocator and each layer's K/V cache. The one place that uses the allocator's prefix-caching API
    (allocate with tokens, cached_prefix, mark_computed, append with the token)."""

    def __init__(self, model: TinyLM, num_blocks: int, block_size: int | None, prefix_caching: bool):
        extra = dict(prefix_caching=True) if prefix_caching else {}
        self.alloc = self.allocator(model, num_blocks, block_size, **extra)
        c = model.cfg
        self.prefix_caching = prefix_caching
        shape = (num_blocks, self.alloc.block_size, c.Hkv, c.D)
        # NaN: a slot read before it is written poisons the output, and the token check fails.
        self.k = [torch.full(shape, float("nan"), device=model.device, dtype=model.dtype) for _ in range(c.layers)]
        self.v = [torch.full(shape, float("nan"), device=model.device, dtype=model.dtype) for _ in range(c.layers)]

    @staticmethod
    def allocator(model: TinyLM, num_blocks: int, block_size: int | None, **kw) -> tunebench.BlockAllocator:
        """The block size: explicit, else tuned for the model's KV geometry on this GPU, else the default."""
        c = model.cfg
        return tunebench.BlockAllocator(num_blocks, block_size, kv_heads=c.Hkv, head_dim=c.D,
                                        dtype=str(model.dtype).removeprefix("torch."), **kw)

    @classmethod
    def blocks_to_hold(cls, model: TinyLM, block_size: int | None, requests: list[Request]) -> int:
        """Blocks for every request at once, none shared: then nothing is preempted."""
        probe = cls.allocator(model, 1, block_size)
        return sum(probe.blocks_for(len(r.prompt) + r.max_tokens - 1) for r in requests)

    def admit(self, seq: Sequence) -> bool:
        """Blocks for all of seq's tokens, or False (nothing changed) when the pool lacks them. Computing starts
        after the cached prefix, which the allocator keeps short of the last token: its logits give the next one."""
        try:
            if self.prefix_caching:
                self.alloc.allocate(seq.rid, len(seq.tokens), tokens=seq.tokens)
                cached = self.alloc.cached_prefix(seq.rid)
            else:
                self.alloc.allocate(seq.rid, len(seq.tokens))
                cached = 0
        except tunebench.OutOfBlocks:
            return False
        assert cached < len(seq.tokens) and cached % self.alloc.block_size == 0, cached
        seq.computed = cached
        if seq.first_hit is None:
            seq.first_hit = cached
        return True

    def needs_slot(self, seq: Sequence) -> bool:
        return self.alloc.num_tokens(seq.rid) < len(seq.tokens)

    def can_append(self, seq: Sequence) -> bool:
        return self.alloc.can_append(seq.rid)

    def append(self, seq: Sequence) -> None:
        if self.prefix_caching:
            self.alloc.append(seq.rid, seq.tokens[-1])
        else:
            self.alloc.append(seq.rid)
        assert not self.alloc.take_copies(), "nothing is forked, so nothing is copied on write"

    def mark_computed(self, seq: Sequence) -> None:
        if self.prefix_caching:
            self.alloc.mark_computed(seq.rid, seq.computed)

    def free(self, seq: Sequence) -> None:
        self.alloc.free(seq.rid)
        seq.computed = 0


class Scheduler:
    """Waiting and running queues. schedule() picks a step's (sequence, new tokens) within the token budget;
    finish_step() takes the step's sampled tokens."""

    def __init__(self, pool: KVPool, token_budget: int, max_seqs: int):
        if token_budget < 1 or max_seqs < 1:
            raise ValueError(f"token_budget and max_seqs must be >= 1, got {token_budget} and {max_seqs}")
        self.pool, self.token_budget, self.max_seqs = pool, token_budget, max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.pool.alloc.blocks_for(len(seq.tokens) + seq.request.max_tokens - 1) > self.pool.alloc.num_blocks:
            raise ValueError(f"request {seq.rid} needs more blocks than the pool's {self.pool.alloc.num_blocks}")
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _reserve(self, seq: Sequence, others: deque) -> bool:
        """A slot for seq's newest token if it needs one, preempting the latest of `others`, then seq itself."""
        if not self.pool.needs_slot(seq):
            return True
        while not self.pool.can_append(seq):
            victim = others.pop() if others else seq
            self._preempt(victim)
            if victim is seq:
                return False
        self.pool.append(seq)
        return True

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget, batch, kept = self.token_budget, [], []
        running, preempted = deque(self.running), self.preemptions
        while running and budget:
            seq = running.popleft()
            if self._reserve(seq, running):
                batch.append((seq, min(seq.remaining, budget)))
                budget -= batch[-1][1]
                kept.append(seq)
        self.running = kept + list(running)
        while self.waiting and budget and len(self.running) < self.max_seqs and self.preemptions == preempted:
            seq = self.waiting[0]
            if not self.pool.admit(seq):
                break
            self.running.append(self.waiting.popleft())
            batch.append((seq, min(seq.remaining, budget)))
            budget -= batch[-1][1]
        if not batch:
            raise RuntimeError("nothing to schedule: the first waiting request does not fit the empty pool")
        return batch

    def finish_step(self, batch: list[tuple[Sequence, int]], sampled: list[int | None], now: float) -> None:
        for (seq, n), token in zip(batch, sampled):
            seq.chunks += seq.computed < len(seq.request.prompt)
            seq.computed += n
            self.pool.mark_computed(seq)
            if token is None:
                continue
            seq.tokens.append(token)
            if seq.first_token_s is None:
                seq.first_token_s = now
            if seq.done:
                self.pool.free(seq)
                self.running.remove(seq)


@dataclass
class StepPlan:
    """What every layer of one step reuses: the new tokens, their cache slots and the kernels' metadata."""
    tokens: torch.Tensor        # [T] int64
    slots: torch.Tensor         # [T] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    sample_rows: list[int | None]   # per sequence: the row whose logits give its next token, if it has one
    decode_only: bool


class ModelRunner:
    """Runs one scheduled step of the model over the paged cache and samples greedily."""

    def __init__(self, model: TinyLM, pool: KVPool):
        self.model, self.pool = model, pool
        self.mixed_steps = self.decode_steps = self.prefill_steps = self.tokens_run = 0

    def plan(self, batch: list[tuple[Sequence, int]]) -> StepPlan:
        alloc, dev = self.pool.alloc, self.model.device
        tokens, slots, cu, rows = [], [], [0], []
        for seq, n in batch:
            tokens += seq.tokens[seq.computed:seq.computed + n]
            slots += [alloc.slot(seq.rid, p) for p in range(seq.computed, seq.computed + n)]
            cu.append(cu[-1] + n)
            rows.append(cu[-1] - 1 if seq.computed + n == len(seq.tokens) else None)
        ids = [seq.rid for seq, _ in batch]
        return StepPlan(torch.tensor(tokens, device=dev), torch.tensor(slots, device=dev),
                        torch.tensor(cu, dtype=torch.int32, device=dev),
                        torch.tensor([seq.computed + n for seq, n in batch], dtype=torch.int32, device=dev),
                        alloc.block_tables(ids, device=dev), rows, all(n == 1 for _, n in batch))

    def _count(self, batch):
        decodes = sum(seq.computed >= len(seq.request.prompt) for seq, _ in batch)
        self.decode_steps += decodes == len(batch)
        self.prefill_steps += decodes == 0
        self.mixed_steps += 0 < decodes < len(batch)
        self.tokens_run += sum(n for _, n in batch)

    def run(self, batch: list[tuple[Sequence, int]]) -> list[int | None]:
        self._count(batch)
        plan = self.plan(batch)
        pool = self.pool

        def attend(layer, q, k, v):
            cache_write.launch(k, v, pool.k[layer], pool.v[layer], plan.slots, WRITE_CONFIG)
            if plan.decode_only:
                return tunebench.paged_attention(q, pool.k[layer], pool.v[layer], plan.block_tables,
                                                 plan.context_lens)
            return tunebench.paged_prefill(q, pool.k[layer], pool.v[layer], plan.block_tables, plan.cu_seqlens_q,
                                           plan.context_lens, check_values=layer == 0)   # one host sync a step

        logits = self.model.forward(plan.tokens, attend)
        wanted = [r for r in plan.sample_rows if r is not None]
        sampled = iter(logits[wanted].argmax(-1).tolist())
        return [None if r is None else next(sampled) for r in plan.sample_rows]


def serve(model: TinyLM, requests: list[Request], *, num_blocks: int | None = None, block_size: int | None = None,
          token_budget: int = 1024, max_seqs: int = 64, prefix_caching: bool = False) -> dict:
    """Serves every request to completion; returns their tokens, timings and the scheduler's and pool's counts.
    num_blocks None: room for every request at once, unshared."""
    if num_blocks is None:
        num_blocks = KVPool.blocks_to_hold(model, block_size, requests)
    pool = KVPool(model, num_blocks, block_size, prefix_caching)
    scheduler, runner = Scheduler(pool, token_budget, max_seqs), ModelRunner(model, pool)
    seqs = [Sequence(r) for r in requests]
    for seq in seqs:
        scheduler.add(seq)
    sync = torch.cuda.synchronize if str(model.device).startswith("cuda") else (lambda: None)
    sync()
    t0, steps = time.perf_counter(), 0
    while scheduler.waiting or scheduler.running:
        batch = scheduler.schedule()
        scheduler.finish_step(batch, runner.run(batch), time.perf_counter() - t0)
        steps += 1
    sync()
    seconds = time.perf_counter() - t0
    bs = pool.alloc.block_size
    shared_blocks = sum(r.system_len // bs for r in requests)
    hit_blocks = sum(min(s.first_hit, s.request.system_len) // bs for s in seqs)
    return dict(tokens={s.rid: s.generated for s in seqs}, seconds=seconds, steps=steps,
                tokens_per_s=sum(len(s.generated) for s in seqs) / seconds,
                ttft=sorted(s.first_token_s for s in seqs), preemptions=scheduler.preemptions,
                chunked=sum(s.chunks > 1 for s in seqs), mixed_steps=runner.mixed_steps,
                decode_steps=runner.decode_steps, prefill_steps=runner.prefill_steps, tokens_run=runner.tokens_run,
                shared_hit_rate=hit_blocks / shared_blocks if shared_blocks else 0.0, stats=pool.alloc.stats(),
                block_size=bs, block_size_source=pool.alloc.block_size_source, prefix_caching=prefix_caching)


def reference(model: TinyLM, requests: list[Request]) -> tuple[dict[int, list[int]], dict[int, list[float]]]:
    """Greedy tokens of each request from the dense reference (SDPA over a contiguous cache per request), and the gap
    between the two largest logits at each token: a mismatch where that gap is tiny may be a near-tie."""
    dense, dev = DenseRunner(model), model.device
    out, gaps = {r.rid: [] for r in requests}, {r.rid: [] for r in requests}

    def take(active, logits):
        top = logits.topk(2, dim=-1)
        for r, t, (a, b) in zip(active, top.indices[:, 0].tolist(), top.values.tolist()):
            out[r.rid].append(t)
            gaps[r.rid].append(a - b)

    for r in requests:
        take([r], dense.prefill(r.rid, torch.tensor(r.prompt, device=dev))[None])
    active = [r for r in requests if r.max_tokens > 1]
    while active:
        take(active, dense.decode([r.rid for r in active], torch.tensor([out[r.rid][-1] for r in active], device=dev)))
        active = [r for r in active if len(out[r.rid]) < r.max_tokens]
    return out, gaps


def run(cfg: ModelConfig = ModelConfig(), n: int = 64, system_len: int = 1024, systems: int = 1, suffix=(16, 128),
        max_tokens=(16, 128), num_blocks: int | None = None, block_size: int | None = None, token_budget: int = 1024,
        max_seqs: int = 64, prefix_caching=(False,), device=None, dtype=torch.float32, seed: int = 0,
        warmup: bool | None = None) -> dict:
    """Serves the same requests once per setting in ``prefix_caching`` (a tuple of bools) and computes the dense
    reference once. Returns {"expected": reference tokens, "gaps": the reference's top-2 logit gaps, "runs":
    [serve(...) result per setting], "requests", "warmup"}. ``warmup``
    (default: on a GPU) serves them once untimed first, so that compilation is not timed."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = TinyLM(cfg, device, dtype, seed)
    requests = make_requests(cfg.vocab, n, system_len, systems, suffix, max_tokens, seed)
    kw = dict(num_blocks=num_blocks, block_size=block_size, token_budget=token_budget, max_seqs=max_seqs)
    if warmup is None:
        warmup = device == "cuda"
    if warmup:
        for pc in prefix_caching:
            serve(model, requests, prefix_caching=pc, **kw)
    runs = [serve(model, requests, prefix_caching=pc, **kw) for pc in prefix_caching]
    expected, gaps = reference(model, requests)
    return dict(expected=expected, gaps=gaps, runs=runs, requests=requests, warmup=warmup)


def _percentile(xs: list[float], p: float) -> float:
    """Nearest rank of sorted xs."""
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


def _first_difference(got: list[int], want: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def report(r: dict, expected: dict, gaps: dict) -> bool:
    """Prints one run's numbers; True when every request's tokens equal the reference's."""
    t, s = r["ttft"], r["stats"]
    wrong = {rid: _first_difference(toks, expected[rid]) for rid, toks in r["tokens"].items() if toks != expected[rid]}
    print(f"prefix caching {'on' if r['prefix_caching'] else 'off'}: {sum(map(len, r['tokens'].values()))} tokens "
          f"in {r['seconds']:.3f} s, {r['tokens_per_s']:.1f} tokens/s over {r['steps']} steps "
          f"({r['prefill_steps']} prefill, {r['mixed_steps']} mixed, {r['decode_steps']} decode-only), "
          f"{r['tokens_run']} tokens run through the model")
    print(f"  time to first token: mean {sum(t) / len(t) * 1e3:.1f} ms, p50 {_percentile(t, 50) * 1e3:.1f} ms, "
          f"p90 {_percentile(t, 90) * 1e3:.1f} ms; preemptions {r['preemptions']}; "
          f"{r['chunked']} prompts prefilled in several chunks")
    print(f"  prefix cache: {100 * r['shared_hit_rate']:.1f}% of the shared system-prompt blocks hit; allocator: "
          f"{s.summary()}")
    print(f"  tokens equal to the dense SDPA reference: {not wrong}")
    for rid, i in wrong.items():
        gap = f"{gaps[rid][i]:.2e}" if i < len(gaps[rid]) else "n/a"
        print(f"    request {rid} differs from token {i} on (the reference's top-2 logit gap there: {gap})")
    return not wrong


def summary(r: dict) -> dict:
    """One run's numbers as plain data (what --json writes)."""
    t, s = r["ttft"], r["stats"]
    return dict(prefix_caching=r["prefix_caching"], requests=len(t), seconds=r["seconds"],
                tokens_per_s=r["tokens_per_s"], ttft_mean_s=sum(t) / len(t), ttft_p50_s=_percentile(t, 50),
                ttft_p90_s=_percentile(t, 90), preemptions=r["preemptions"], steps=r["steps"],
                tokens_run=r["tokens_run"], shared_hit_rate=r["shared_hit_rate"],
                prefix_hit_pct=s.prefix_hit_pct, evictions=s.evictions, block_size=r["block_size"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a tiny model and workload that the CPU interpreter runs")
    p.add_argument("-n", "--requests", type=int, default=None, help="requests (default 64; --small 6)")
    p.add_argument("--system", type=int, default=None, help="system prompt tokens (default 1024; --small 40)")
    p.add_argument("--systems", type=int, default=1, help="distinct system prompts, shared round robin")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="KV blocks in the pool (default: room for every request at once, unshared; fewer preempt)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per block (default: tuned, else 16)")
    p.add_argument("--token-budget", type=int, default=None, help="new tokens per step (default 1024; --small 32)")
    p.add_argument("--max-seqs", type=int, default=64, help="running sequences at most")
    p.add_argument("--prefix-caching", choices=("off", "on", "both"), default="both",
                   help="serve without, with, or without and then with the allocator's prefix caching")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="float32 makes the token-for-token comparison with the dense reference meaningful")
    p.add_argument("--json", default=None, metavar="FILE", help="also write each run's numbers to FILE")
    args = p.parse_args(argv)
    small = args.small
    pc = {"off": (False,), "on": (True,), "both": (False, True)}[args.prefix_caching]
    out = run(SMALL if small else ModelConfig(), args.requests or (6 if small else 64),
              args.system or (40 if small else 1024), args.systems, (3, 12) if small else (16, 128),
              (3, 8) if small else (16, 128), args.num_blocks,
              args.block_size or (8 if small else None), args.token_budget or (32 if small else 1024), args.max_seqs,
              pc, dtype=getattr(torch, args.dtype))
    r0 = out["runs"][0]
    print(f"{len(out['requests'])} requests, block size {r0['block_size']} ({r0['block_size_source']}), "
          f"wall clock{' after an untimed warm-up run' if out['warmup'] else ''}")
    ok = [report(r, out["expected"], out["gaps"]) for r in out["runs"]]
    if len(out["runs"]) == 2:
        off, on = (sum(r["ttft"]) / len(r["ttft"]) for r in out["runs"])
        print(f"prefix caching: mean time to first token {on * 1e3:.1f} ms vs {off * 1e3:.1f} ms without "
              f"({off / on:.2f}x), {out['runs'][1]['tokens_per_s'] / out['runs'][0]['tokens_per_s']:.2f}x tokens/s")
    if args.json:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
        pathlib.Path(args.json).write_text(json.dumps(dict(device=device, tokens_equal=all(ok),
                                                           runs=[summary(r) for r in out["runs"]]), indent=1))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
