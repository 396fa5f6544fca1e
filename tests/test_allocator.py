"""The paged KV block allocator: every verb and error, a Hypothesis state machine against a model of physical memory,
a synthetic trace's waste, and the memory that parallel sampling and beam forks save."""
import random
import subprocess
import sys
import types
from collections import Counter

import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from tunebench.runtime.allocator import BlockAllocator, OutOfBlocks, block_hash


def state(a: BlockAllocator):
    """Everything an allocator holds, to check that a failed verb changed nothing."""
    return (list(a.free_ids), list(a.ref_counts), set(a.used_ids), dict(a._copies), list(a.evictable),
            dict(a.block_hashes), a.stats(), {s: (a.block_table(s), a.num_tokens(s), a.cached_prefix(s))
                                              for s in a.sequences})


# -- allocate

def test_allocate_gives_prompt_slots_in_its_blocks():
    a = BlockAllocator(8, 8)
    slots = a.allocate("s", 12)
    table = a.block_table("s")
    assert len(table) == 2 and a.num_tokens("s") == 12
    assert slots == [table[i // 8] * 8 + i % 8 for i in range(12)] == [a.slot("s", i) for i in range(12)]
    assert all(a.ref_counts[b] == 1 for b in table) and a.stats().free_blocks == 6


def test_allocate_empty_prompt_takes_no_block():
    a = BlockAllocator(2, 8)
    assert a.allocate("s", 0) == [] and a.block_table("s") == []
    assert a.append("s") == a.block_table("s")[0] * 8       # the first token takes the first block


def test_allocate_rejects_duplicates_and_bad_lengths():
    a = BlockAllocator(4, 8)
    a.allocate(1, 3)
    with pytest.raises(ValueError, match="already exists"):
        a.allocate(1, 3)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="prompt_len"):
            a.allocate(2, bad)


def test_allocate_out_of_blocks_says_how_many_and_changes_nothing():
    a = BlockAllocator(4, 8)
    a.allocate("a", 17)                                      # 3 blocks
    before = state(a)
    assert not a.can_allocate(9) and a.can_allocate(8)
    with pytest.raises(OutOfBlocks, match=r"needs 2 free block\(s\), 1 of 4 free") as e:
        a.allocate("b", 9)
    assert isinstance(e.value, RuntimeError) and (e.value.needed, e.value.free) == (2, 1)
    assert state(a) == before and "b" not in a


# -- append

def test_append_fills_the_last_block_then_takes_a_new_one():
    a = BlockAllocator(4, 8)
    a.allocate("s", 7)
    first = a.block_table("s")[0]
    assert a.append("s") == first * 8 + 7                    # fills block 0: no new block
    assert len(a.block_table("s")) == 1
    slot = a.append("s")                                     # block full: a new one
    second = a.block_table("s")[1]
    assert second != first and slot == second * 8 and a.num_tokens("s") == 9
    assert a.take_copies() == []


def test_append_out_of_blocks_changes_nothing():
    a = BlockAllocator(1, 8)
    a.allocate("s", 8)
    before = state(a)
    assert not a.can_append("s")
    with pytest.raises(OutOfBlocks, match="append to 's': needs 1 free block"):
        a.append("s")
    assert state(a) == before


def test_unknown_sequence_is_a_key_error():
    a = BlockAllocator(2, 8)
    for verb in (a.append, a.free, a.can_append, a.num_tokens, a.block_table):
        with pytest.raises(KeyError, match="unknown sequence 'x'"):
            verb("x")
    with pytest.raises(KeyError):
        a.fork("x", "y")


# -- fork and copy-on-write

def test_fork_shares_every_block():
    a = BlockAllocator(8, 8)
    a.allocate("p", 12)
    a.fork("p", "c")
    assert a.block_table("c") == a.block_table("p") and a.num_tokens("c") == 12
    assert [a.ref_counts[b] for b in a.block_table("p")] == [2, 2]
    assert a.stats().used_blocks == 2
    with pytest.raises(ValueError, match="already exists"):
        a.fork("p", "c")


def test_append_to_shared_partial_block_copies_it_first():
    a = BlockAllocator(8, 8)
    a.allocate("p", 12)
    a.fork("p", "c")
    full, shared = a.block_table("p")
    slot = a.append("c")
    fresh = a.block_table("c")[1]
    assert fresh != shared and slot == fresh * 8 + 4
    assert a.block_table("c")[0] == full and a.ref_counts[full] == 2
    assert a.ref_counts[shared] == 1 and a.ref_counts[fresh] == 1
    assert a.take_copies() == [(shared, fresh)] and a.take_copies() == []
    assert a.append("p") == shared * 8 + 4                   # now the parent alone holds it: written in place
    assert a.take_copies() == []


def test_append_to_shared_full_block_needs_no_copy():
    a = BlockAllocator(8, 8)
    a.allocate("p", 16)
    a.fork("p", "c")
    a.append("c")
    assert a.block_table("c")[:2] == a.block_table("p") and len(a.block_table("c")) == 3
    assert a.take_copies() == []


def test_copy_on_write_out_of_blocks_changes_nothing():
    a = BlockAllocator(2, 8)
    a.allocate("p", 12)
    a.fork("p", "c")
    before = state(a)
    assert not a.can_append("c")
    with pytest.raises(OutOfBlocks):
        a.append("c")
    assert state(a) == before


# -- free

def test_free_returns_a_block_when_its_count_reaches_zero():
    a = BlockAllocator(4, 8)
    a.allocate("p", 9)
    a.fork("p", "c")
    a.free("p")
    assert "p" not in a and a.stats().used_blocks == 2
    assert all(a.ref_counts[b] == 1 for b in a.block_table("c"))
    a.free("c")
    assert a.stats().free_blocks == 4 and a.ref_counts == [0] * 4 and not a.used_ids


def test_freeing_a_copys_destination_drops_the_copy():
    a = BlockAllocator(4, 8)
    a.allocate("p", 2)
    a.fork("p", "c")
    a.append("c")
    a.free("c")
    assert a.take_copies() == []


# -- block tables and stats

def test_block_tables_are_int32_padded_with_block_0():
    a = BlockAllocator(8, 8)
    a.allocate("a", 17)
    a.allocate("b", 1)
    t = a.block_tables(["b", "a"])
    assert t.dtype == torch.int32 and t.shape == (2, 3)
    assert t.tolist() == [a.block_table("b") + [0, 0], a.block_table("a")]
    assert a.block_tables(["a"], width=5).shape == (1, 5)
    assert a.context_lens(["a", "b"]).tolist() == [17, 1] and a.context_lens(["a"]).dtype == torch.int32
    with pytest.raises(ValueError, match="width 2"):
        a.block_tables(["a"], width=2)


def test_stats_count_blocks_tokens_waste_and_sharing():
    a = BlockAllocator(10, 8)
    a.allocate("p", 12)                                      # blocks: 8 + 4 tokens
    a.fork("p", "c")
    s = a.stats()
    assert (s.used_blocks, s.free_blocks, s.logical_tokens, s.stored_tokens) == (2, 8, 24, 12)
    assert s.waste_pct == pytest.approx(100 * 4 / 16)
    assert (s.unshared_blocks, s.saved_blocks, s.saved_pct) == (4, 2, 50.0)
    assert "2/10 blocks of 8 used" in s.summary() and "prefix" not in s.summary()


# -- prefix caching

SYSTEM = list(range(100, 120))                               # a 20-token system prompt: 2 full blocks of 8 + 4


def test_second_request_with_the_same_system_prompt_shares_its_full_blocks():
    a = BlockAllocator(32, 8, prefix_caching=True)
    slots_a = a.allocate("a", 25, tokens=SYSTEM + [1, 2, 3, 4, 5])
    assert a.cached_prefix("a") == 0
    a.mark_computed("a", 25)                                 # 3 full blocks enter the cache
    slots_b = a.allocate("b", 27, tokens=SYSTEM + [7] * 7)
    ta, tb = a.block_table("a"), a.block_table("b")
    assert a.cached_prefix("b") == 16 and tb[:2] == ta[:2] and not set(tb[2:]) & set(ta)
    assert slots_b[:16] == slots_a[:16] and [a.ref_counts[b] for b in tb] == [2, 2, 1, 1]
    s = a.stats()
    # queries: a's 3 blocks before its last token + b's 3; hits: b's first 2, both held by a then (memory saved)
    assert (s.prefix_query_blocks, s.prefix_hit_blocks, s.prefix_saved_blocks, s.evictions) == (6, 2, 2, 0)
    assert s.prefix_hit_pct == pytest.approx(100 * 2 / 6)
    assert (s.used_blocks, s.unshared_blocks, s.saved_blocks, s.cached_blocks, s.evictable_blocks) == (6, 8, 2, 3, 0)
    assert s.summary().endswith("prefix cache: 2/6 blocks hit (33.3%), 2 shared live, 3 cached (0 evictable), "
                                "0 evicted")


def test_a_block_is_not_found_before_it_is_marked_computed():
    a = BlockAllocator(32, 8, prefix_caching=True)
    a.allocate("a", 20, tokens=SYSTEM)
    a.allocate("b", 20, tokens=SYSTEM)                       # a's K/V not written yet: no hit
    a.mark_computed("a", 7)                                  # no full block computed yet
    a.allocate("c", 20, tokens=SYSTEM)
    assert a.cached_prefix("b") == a.cached_prefix("c") == 0
    a.mark_computed("a", 20)
    a.mark_computed("b", 20)                                 # same content: a's blocks stay the cached ones
    assert set(a.block_hashes) == set(a.block_table("a")[:2])
    a.allocate("d", 20, tokens=SYSTEM)
    assert a.cached_prefix("d") == 16 and a.block_table("d")[:2] == a.block_table("a")[:2]
    a.free("b")                                              # its uncached blocks go back to the free list
    assert not a.evictable and a.stats().free_blocks == 32 - 3 - 3 - 1


def test_the_prompts_last_token_is_always_computed():
    a = BlockAllocator(8, 8, prefix_caching=True)
    a.allocate("a", 16, tokens=SYSTEM[:16])
    a.mark_computed("a", 16)
    for seq, n, cached in (("b", 16, 8), ("c", 17, 16), ("d", 9, 8), ("e", 8, 0)):
        a.allocate(seq, n, tokens=SYSTEM[:n])
        assert a.cached_prefix(seq) == cached, seq
    assert a.block_table("b")[1] != a.block_table("a")[1]    # the last token's block is not shared: no copy
    assert a.take_copies() == []


def test_freed_cached_blocks_are_evicted_least_recently_used_only_when_the_free_list_is_empty():
    a = BlockAllocator(5, 8, prefix_caching=True)
    x, y = list(range(16)), list(range(50, 66))
    for seq, tokens in (("x", x), ("y", y)):
        a.allocate(seq, 16, tokens=tokens)
        a.mark_computed(seq, 16)
    x0, x1 = a.block_table("x")
    y0, y1 = a.block_table("y")
    a.free("x")
    a.free("y")                                              # last block first: a prompt's tail goes first
    assert list(a.evictable) == [x1, x0, y1, y0] and len(a.free_ids) == 1
    a.allocate("z", 17, tokens=[9] * 17)                     # the free block, then evicts x1, x0
    assert a.stats().evictions == 2 and list(a.evictable) == [y1, y0]
    assert a.can_allocate(16) and not a.can_allocate(17)     # evictable blocks count as available
    a.allocate("y2", 9, tokens=y[:9])                         # a hit revives y0 (and takes y1 for its tail)
    assert a.cached_prefix("y2") == 8 and a.block_table("y2")[0] == y0
    assert a.stats().evictions == 3 and not a.evictable and not a.free_ids
    assert a.stats().prefix_saved_blocks == 0                 # y0 was held by nobody: compute saved, not memory


def test_out_of_blocks_counts_revived_hits_once_and_changes_nothing():
    a = BlockAllocator(3, 8, prefix_caching=True)
    a.allocate("a", 16, tokens=SYSTEM[:16])
    a.mark_computed("a", 16)
    a.free("a")                                              # 2 evictable + 1 free
    prompt = SYSTEM[:16] + [0] * 9                           # 4 blocks, 2 hit: needs 2, but only 1 other block
    before = state(a)
    assert not a.can_allocate(25, tokens=prompt) and not a.can_allocate(25)
    with pytest.raises(OutOfBlocks, match=r"needs 2 free block\(s\), 1 of 3 free"):
        a.allocate("b", 25, tokens=prompt)
    assert state(a) == before
    assert a.can_allocate(24, tokens=prompt[:24])            # 3 blocks, 2 of them hits: needs the free one
    a.allocate("b", 24, tokens=prompt[:24])
    assert a.cached_prefix("b") == 16 and a.stats().evictions == 0


def test_fork_copy_on_write_and_decode_tokens_with_prefix_caching():
    a = BlockAllocator(16, 8, prefix_caching=True)
    a.allocate("p", 12, tokens=SYSTEM[:12])
    a.mark_computed("p", 12)
    a.fork("p", "c")
    shared = a.block_table("p")[1]
    a.append("c", 7)                                         # shared partly filled block: copied first
    assert a.take_copies() == [(shared, a.block_table("c")[1])]
    for t in SYSTEM[12:16]:
        a.append("p", t)                                     # decode fills p's second block with known tokens
    a.mark_computed("p", 16)
    assert a.block_hashes.keys() == set(a.block_table("p")[:2])
    a.allocate("q", 17, tokens=SYSTEM[:17])
    assert a.cached_prefix("q") == 16 and a.block_table("q")[:2] == a.block_table("p")
    a.append("c")                                            # no id: c's later blocks never enter the cache
    for _ in range(3):
        a.append("c", 1)
    a.mark_computed("c", 16)
    assert a.block_table("c")[1] not in a.block_hashes


def test_tokens_are_optional_and_ignored_without_prefix_caching():
    a = BlockAllocator(8, 8)
    a.allocate("a", 16, tokens=SYSTEM[:16])
    a.mark_computed("a", 16)
    a.allocate("b", 17, tokens=SYSTEM[:17])
    assert a.cached_prefix("b") == 0 and not a.block_hashes and a.stats().prefix_query_blocks == 0
    assert "prefix" not in a.stats().summary()


def test_bad_counts_page_sizes_and_tokens_are_refused():
    for bad in (-100, 1.5, True, None, "3"):
        with pytest.raises(ValueError, match="prompt_len"):
            BlockAllocator(4, 8).can_allocate(bad)
    for bad in (3, 1, 4, 0, -8, 256, 16.0, True):
        with pytest.raises(ValueError, match=r"block_size must be .* one of \(8, 16, 32, 64, 128\)"):
            BlockAllocator(4, bad)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_blocks"):
            BlockAllocator(bad, 8)
    with pytest.raises(ValueError, match="prefix_caching must be a bool"):
        BlockAllocator(4, 8, prefix_caching=1)
    a = BlockAllocator(4, 8, prefix_caching=True)
    a.allocate("s", 3, tokens=[1, 2, 3])
    before = state(a)
    for kwargs, match in ((dict(), "needs the prompt's token ids"), (dict(tokens=[1, 2]), "2 ids for a prompt of 3"),
                          (dict(tokens=[1, 2, 1.5]), "token id"), (dict(tokens=[1, True, 2]), "token id"),
                          (dict(tokens="abc"), "sequence of token ids"), (dict(tokens=5), "sequence of token ids")):
        with pytest.raises(ValueError, match=match):
            a.allocate("t", 3, **kwargs)
    for bad in (4, -1, 1.5):
        with pytest.raises(ValueError, match="num_tokens"):
            a.mark_computed("s", bad)
    with pytest.raises(ValueError, match="token id"):
        a.append("s", 1.5)
    assert state(a) == before
    with pytest.raises(KeyError, match="unknown sequence 'x'"):
        a.cached_prefix("x")
    with pytest.raises(ValueError, match="token id"):
        a.allocate("t", 2, tokens=torch.tensor([True, False]))
    a.mark_computed("s", 3)
    a.allocate("t", 9, tokens=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]))    # a tensor is read in one copy
    a.mark_computed("t", 9)
    a.allocate("u", 9, tokens=list(range(1, 10)))
    assert a.cached_prefix("u") == 8


# -- where the block size comes from

@pytest.fixture
def fake_dispatch(monkeypatch):
    calls = []

    def install(value):
        def tuned_paged_block_size(kv_heads, head_dim, dtype):
            calls.append((kv_heads, head_dim, dtype))
            return value
        mod = types.ModuleType("tunebench.runtime.dispatch")
        mod.tuned_paged_block_size = tuned_paged_block_size
        monkeypatch.setitem(sys.modules, "tunebench.runtime.dispatch", mod)
        return calls
    return install


def test_block_size_explicit_wins(fake_dispatch):
    fake_dispatch(64)
    a = BlockAllocator(4, 8, kv_heads=8, head_dim=128, dtype="float16")
    assert (a.block_size, a.block_size_source) == (8, "explicit")


def test_block_size_tuned_when_stored(fake_dispatch):
    calls = fake_dispatch(32)
    a = BlockAllocator(4, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    assert (a.block_size, a.block_size_source) == (32, "tuned")
    assert calls == [(8, 128, "bfloat16")]


def test_block_size_default_when_nothing_tuned_or_no_dispatcher(fake_dispatch, monkeypatch):
    fake_dispatch(None)
    assert BlockAllocator(4, kv_heads=8, head_dim=128, dtype="fp16").block_size_source == "default"
    monkeypatch.setitem(sys.modules, "tunebench.runtime.dispatch", None)     # importing it raises ImportError
    a = BlockAllocator(4, kv_heads=8, head_dim=128, dtype="fp16")
    assert (a.block_size, a.block_size_source) == (16, "default")
    no_function = types.ModuleType("tunebench.runtime.dispatch")
    monkeypatch.setitem(sys.modules, "tunebench.runtime.dispatch", no_function)
    assert BlockAllocator(4, kv_heads=8, head_dim=128, dtype="fp16").block_size_source == "default"
    assert BlockAllocator(4).block_size_source == "default"


def test_block_size_broken_dispatcher_or_partial_geometry_raises(monkeypatch):
    mod = types.ModuleType("tunebench.runtime.dispatch")

    def broken(*args):
        raise ImportError("no sqlalchemy", name="sqlalchemy")
    mod.__getattr__ = broken
    monkeypatch.setitem(sys.modules, "tunebench.runtime.dispatch", mod)
    with pytest.raises(ImportError, match="sqlalchemy"):
        BlockAllocator(4, kv_heads=8, head_dim=128, dtype="fp16")
    with pytest.raises(ValueError, match="all of kv_heads, head_dim and dtype"):
        BlockAllocator(4, kv_heads=8)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0, 16)


def test_the_allocator_imports_nothing_heavy():
    """Imported in a fresh process (with the package's light __init__s and tunebench.shapes, where its page sizes
    come from), and used with prefix caching but without block tables, it pulls in no torch, numpy or database
    modules: torch comes only with block_tables/context_lens."""
    code = ("import sys; from tunebench.runtime.allocator import BlockAllocator; "
            "a = BlockAllocator(4, 8, prefix_caching=True); "
            "a.allocate(0, 9, tokens=range(9)); a.mark_computed(0, 9); a.fork(0, 1); a.append(1, 5); a.take_copies(); "
            "a.allocate(2, 9, tokens=range(9)); a.stats(); a.free(0); "
            "heavy = {'torch', 'triton', 'numpy', 'optuna', 'sqlalchemy', 'hypothesis'}; "
            "print(a.cached_prefix(2), sorted(n for n in sys.modules if n.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "8 []"


# -- the state machine: the allocator against a model of each sequence's tokens and of physical memory

STEPS = Counter()    # rules run, by name
EVENTS = Counter()   # what the rules ran into: the machine must exercise copies, hits, evictions, out-of-blocks often
MACHINE_EXAMPLES, MACHINE_STEPS = 360, 64
TOKENS = st.integers(0, 1)                                   # a tiny vocabulary: prompts' tails repeat too
PROMPTS = st.tuples(st.integers(0, 2), st.integers(0, 40), st.lists(TOKENS, max_size=10))


def chain_keys(tokens, bs):
    """The cache key of each full block of `tokens`, computed here from scratch."""
    keys = []
    for i in range(len(tokens) // bs):
        keys.append(block_hash(tokens[i * bs:(i + 1) * bs], keys[-1] if keys else None))
    return keys


class AllocatorMachine(RuleBasedStateMachine):
    """Token ids come from a tiny vocabulary and prompts start with one of a few system prompts, so prefixes repeat
    and the pool is small, so freed cached blocks are evicted. A step's writes and copies are pending until `flush`,
    which applies them as the GPU would (copies first, then writes) and checks that every sequence reads its own
    tokens back through its table. The model's memory holds each slot's token, and `owner[block]` the tokens from
    position 0 to the block's last written slot of the sequence that wrote it: the content its cache key must name."""

    @initialize(num_blocks=st.integers(4, 16), block_size=st.sampled_from([8, 16]),
                caching=st.sampled_from([True] * 7 + [False]),
                systems=st.lists(st.lists(TOKENS, min_size=8, max_size=40), min_size=1, max_size=3),
                prompts=st.lists(PROMPTS, min_size=1, max_size=3))
    def setup(self, num_blocks, block_size, caching, systems, prompts):
        self.a = BlockAllocator(num_blocks, block_size, prefix_caching=caching)
        self.bs, self.n, self.caching, self.systems = block_size, num_blocks, caching, systems
        self.tokens = {}                 # seq -> its token ids, in order
        self.known = {}                  # seq -> how many leading tokens the allocator was told (prefix caching)
        self.written = {}                # seq -> positions whose K/V is in memory
        self.computed = {}               # seq -> the most it was marked computed
        self.settled = {}                # seq -> blocks the cache has seen of it: a lower bound of the allocator's
        self.memory = [[None] * block_size for _ in range(num_blocks)]
        self.owner = [None] * num_blocks
        self.writes = []                 # pending (seq, slot, token, position)
        self.copies = []                 # expected pending (src, dst)
        self.counts = Counter()          # expected prefix stats: queries, hits, live hits, evictions
        self.finished = []               # the first 48 tokens of freed sequences: conversations that come back
        self.next_id = 0
        for system, keep, tail in prompts:   # some sequences from the start, whichever rules this example enables
            self._allocate(systems[system % len(systems)][:keep] + tail, True)

    def _step(self, name):
        STEPS[name] += 1
        STEPS["with prefix caching"] += self.caching

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    def _pick(self, data):
        return data.draw(st.sampled_from(sorted(self.tokens)))

    def _live(self):
        return {b for s in self.tokens for b in self.a.block_table(s)}

    def _expect_out_of_blocks(self, verb, *args, **kwargs):
        before = state(self.a)
        try:
            verb(*args, **kwargs)
        except OutOfBlocks:
            assert state(self.a) == before
        else:
            raise AssertionError(f"{verb.__name__}{args} should have run out of blocks")

    def _taking(self, verb, *args, revived=(), **kwargs):
        """Runs a verb that takes blocks, checking what it evicts: only cached blocks nobody holds, least recently
        used first, and only once the free list is empty."""
        a = self.a
        lru = [b for b in a.evictable if b not in revived]
        free_before, hashed_before, refs_before = len(a.free_ids), set(a.block_hashes), list(a.ref_counts)
        result = verb(*args, **kwargs)
        evicted = hashed_before - set(a.block_hashes)
        taken = [b for b in range(self.n) if refs_before[b] == 0 and a.ref_counts[b] > 0 and b not in revived]
        assert all(refs_before[b] == 0 for b in evicted), "evicted a referenced block"
        assert evicted == set(lru[:len(evicted)]) and len(evicted) == max(0, len(taken) - free_before)
        self.counts["evictions"] += len(evicted)
        EVENTS["evictions"] += len(evicted)
        return result

    def _write(self, seq, slot, token):
        """The allocator handed out `slot` for the sequence's next token: it must be that position's slot, in a block
        nobody else references (no shared block is written without a copy first)."""
        i = len(self.tokens[seq])
        table = self.a.block_table(seq)
        assert slot == table[i // self.bs] * self.bs + i % self.bs
        assert self.a.ref_counts[slot // self.bs] == 1
        self.tokens[seq].append(token)
        self.writes.append((seq, slot, token, i))

    def _expected_hits(self, prompt):
        """The cached blocks holding the prompt's leading full blocks (all but its last token's), by content."""
        by_content = {self.owner[b]: b for b in self.a.block_hashes}
        hits = []
        for i in range(max(len(prompt) - 1, 0) // self.bs):
            block = by_content.get(tuple(prompt[:(i + 1) * self.bs]))
            if block is None:
                break
            hits.append(block)
        return hits

    @rule(prompts=st.lists(PROMPTS, min_size=1, max_size=3), tell=st.booleans())
    def allocate(self, prompts, tell):
        """New requests, often with the same system prompt."""
        self._step("allocate")
        for system, keep, tail in prompts:
            self._allocate(self.systems[system % len(self.systems)][:keep] + tail, tell)

    @precondition(lambda self: self.finished)
    @rule(data=st.data(), tail=st.lists(TOKENS, max_size=10))
    def return_visit(self, data, tail):
        """A conversation's next turn: a recently finished sequence's tokens (prompt and output) and a few new ones."""
        self._step("return_visit")
        self._allocate(data.draw(st.sampled_from(self.finished[-3:])) + tail, True)

    @precondition(lambda self: self.a.evictable)
    @rule(more=st.integers(1, 3), short=st.integers(0, 7), finish=st.booleans())
    def pressure(self, more, short, finish):
        """A long request of new tokens that needs more blocks than the free list holds: it evicts cached blocks (or
        runs out), and may finish at once."""
        self._step("pressure")
        seq = self._allocate([2] * ((len(self.a.free_ids) + more) * self.bs - short), True)
        if finish and seq is not None:
            self._free(seq)

    def _allocate(self, prompt, tell):
        seq, size, bs = self._new_id(), len(prompt), self.bs
        tokens = prompt if self.caching or tell else None    # optional (and ignored) without prefix caching
        hits = self._expected_hits(prompt) if self.caching else []
        live = self._live()
        revived = [b for b in hits if b not in live]
        need, available = -(-size // bs) - len(hits), self.n - len(live) - len(revived)
        assert self.a.can_allocate(size, tokens=tokens) == (need <= available)
        assert self.a.can_allocate(size) == (-(-size // bs) <= self.n - len(live))
        if need > available:
            EVENTS["allocate out of blocks"] += 1
            return self._expect_out_of_blocks(self.a.allocate, seq, size, tokens=tokens)
        slots = self._taking(self.a.allocate, seq, size, tokens=tokens, revived=revived)
        table, cached = self.a.block_table(seq), len(hits) * bs
        assert table[:len(hits)] == hits and self.a.cached_prefix(seq) == cached
        assert slots == [table[i // bs] * bs + i % bs for i in range(size)]
        assert all(self.a.ref_counts[b] == 1 for b in table[len(hits):])
        for i, block in enumerate(hits):                   # a hit holds this prompt's K/V, computed before
            assert self.memory[block] == prompt[i * bs:(i + 1) * bs]
        self.counts.update(queries=max(size - 1, 0) // bs if self.caching else 0, hits=len(hits),
                           live_hits=len(hits) - len(revived))
        EVENTS["prefix hits"] += len(hits)
        EVENTS["revived hits"] += len(revived)
        self.tokens[seq] = prompt[:cached]
        self.known[seq] = size if self.caching else 0
        self.written[seq] = self.computed[seq] = cached
        self.settled[seq] = len(hits)
        for position in range(cached, size):
            self._write(seq, slots[position], prompt[position])
        return seq

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append(self, data):
        """A decode step: one token for each of a few sequences (forked siblings copy-on-write in turn)."""
        self._step("append")
        for seq in data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=4, unique=True)):
            self._append(seq, data.draw(TOKENS), data.draw(st.sampled_from([True, True, True, False])))

    def _append(self, seq, token, tell):
        n, table = len(self.tokens[seq]), self.a.block_table(seq)
        shared_partial = n % self.bs != 0 and sum(self.a.block_table(s).count(table[-1]) for s in self.tokens) > 1
        need = 1 if n % self.bs == 0 or shared_partial else 0
        available = self.n - len(self._live())
        assert self.a.can_append(seq) == (need <= available)
        if need > available:
            EVENTS["append out of blocks"] += 1
            return self._expect_out_of_blocks(self.a.append, seq, token if tell else None)
        slot = self._taking(self.a.append, seq, token if tell else None)
        after = self.a.block_table(seq)
        if n % self.bs == 0:
            assert after[:-1] == table and after[-1] not in table
        elif shared_partial:
            assert after[:-1] == table[:-1] and after[-1] != table[-1]
            self.copies.append((table[-1], after[-1]))
            EVENTS["copy-on-write"] += 1
        else:
            assert after == table
        if self.caching and tell and self.known[seq] == n:
            self.known[seq] += 1
        self._write(seq, slot, token)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), children=st.integers(1, 3), then_step=st.booleans())
    def fork(self, data, children, then_step):
        """Parallel sampling and beams: fork a few children, and often take the next step's token for the whole
        family at once (all but the last writer of a shared, partly filled block copy it)."""
        self._step("fork")
        parent = self._pick(data)
        if any(w[0] == parent for w in self.writes):
            self._flush(one_by_one=False)                  # fork between steps, once the parent's K/V is written
        family = [parent]
        for _ in range(children):
            family.append(self._new_id())
            self.a.fork(parent, family[-1])
            for model in (self.known, self.written, self.computed, self.settled):
                model[family[-1]] = model[parent]
            self.tokens[family[-1]] = list(self.tokens[parent])
            assert self.a.block_table(family[-1]) == self.a.block_table(parent)
        if then_step:
            for seq in family:
                self._append(seq, data.draw(TOKENS), True)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def mark_computed(self, data):
        """The caller says how far a sequence's K/V is written: any count up to what the model has flushed."""
        self._step("mark_computed")
        seq = self._pick(data)
        self._mark(seq, data.draw(st.integers(0, self.written[seq]) | st.just(self.written[seq])))

    def _mark(self, seq, n):
        """After it, each newly computed full block of known tokens is findable: cached in its block or another."""
        self.a.mark_computed(seq, n)
        self.computed[seq] = max(self.computed[seq], n)
        settled = min(self.computed[seq], self.known[seq]) // self.bs
        cached = {self.owner[b] for b in self.a.block_hashes}
        for i in range(self.settled[seq], settled):
            assert tuple(self.tokens[seq][:(i + 1) * self.bs]) in cached, (seq, i)
        EVENTS["blocks marked"] += max(settled - self.settled[seq], 0)
        self.settled[seq] = max(self.settled[seq], settled)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        """A beam is pruned: any sequence."""
        self._step("free")
        self._free(self._pick(data))

    @precondition(lambda self: self.tokens)
    @rule(written=st.booleans())
    def finish_oldest(self, written):
        """A request finishes. Frees blocks as often as the verbs take them, so the pool is not full all the time.
        Often its last step is written and marked first, so its blocks stay cached for a return visit."""
        self._step("finish_oldest")
        seq = min(self.tokens)
        if written:
            if any(w[0] == seq for w in self.writes):
                self._flush(one_by_one=True)
            self._mark(seq, self.written[seq])
        self._free(seq)

    def _free(self, seq):
        lru, table = list(self.a.evictable), self.a.block_table(seq)
        self.a.free(seq)
        self.finished.append(self.tokens[seq][:48])
        for model in (self.tokens, self.known, self.written, self.computed, self.settled):
            del model[seq]
        self.writes = [w for w in self.writes if w[0] != seq]
        live = self._live()
        self.copies = [c for c in self.copies if c[1] in live]
        released = [b for b in reversed(table) if b not in live and b in self.a.block_hashes]
        assert list(self.a.evictable) == lru + released     # most recently used last, the sequence's tail first

    @rule(data=st.data())
    def block_tables(self, data):
        self._step("block_tables")
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), max_size=4)) if self.tokens else []
        t = self.a.block_tables(seqs)
        width = max((-(-len(self.tokens[s]) // self.bs) for s in seqs), default=0)
        assert t.dtype == torch.int32 and tuple(t.shape) == (len(seqs), width)
        for row, s in zip(t.tolist(), seqs):
            table = self.a.block_table(s)
            assert row == table + [0] * (width - len(table))
        assert self.a.context_lens(seqs).tolist() == [len(self.tokens[s]) for s in seqs]

    @rule(one_by_one=st.booleans(), mark=st.sampled_from([True, True, True, False]))
    def flush(self, one_by_one, mark):
        """The GPU step; then, as a serving loop does, often mark every sequence computed."""
        self._step("flush")
        self._flush(one_by_one)
        if mark:
            for seq in list(self.tokens):
                self._mark(seq, self.written[seq])

    def _flush(self, one_by_one):
        copies = self.a.take_copies()
        assert copies == self.copies and len({dst for _, dst in copies}) == len(copies)
        if one_by_one:
            for src, dst in copies:
                self.memory[dst], self.owner[dst] = list(self.memory[src]), self.owner[src]
        else:                                              # gather every source, then scatter
            for (_, dst), content in [(c, (list(self.memory[c[0]]), self.owner[c[0]])) for c in copies]:
                self.memory[dst], self.owner[dst] = content
        for seq, slot, token, position in self.writes:
            block = slot // self.bs
            assert [b for s in self.tokens for b in self.a.block_table(s)].count(block) == 1
            assert block not in self.a.block_hashes            # a cached block is never written again
            self.memory[block][slot % self.bs] = token
            self.owner[block] = tuple(self.tokens[seq][:position + 1])
        EVENTS["writes checked"] += len(self.writes)
        EVENTS["copies applied"] += len(copies)
        self.copies, self.writes = [], []
        for seq, tokens in self.tokens.items():
            table = self.a.block_table(seq)
            assert [self.memory[table[i // self.bs]][i % self.bs] for i in range(len(tokens))] == tokens
            self.written[seq] = len(tokens)

    @invariant()
    def ref_counts_match_block_tables(self):
        refs = Counter(b for s in self.tokens for b in self.a.block_table(s))
        assert [self.a.ref_counts[b] for b in range(self.n)] == [refs[b] for b in range(self.n)]
        free, lru = list(self.a.free_ids), list(self.a.evictable)
        assert len(set(free)) + len(set(lru)) + len(refs) == len(free) + len(lru) + len(refs) == self.n
        assert set(free).isdisjoint(refs) and set(lru).isdisjoint(refs) and self.a.used_ids == set(refs)
        for s, tokens in self.tokens.items():
            assert self.a.num_tokens(s) == len(tokens) and len(self.a.block_table(s)) == -(-len(tokens) // self.bs)

    @invariant()
    def cached_blocks_hold_what_their_keys_name(self):
        """Every cached block is full, computed, never free-listed, found by its key alone, and its key is the chain
        of its content's blocks computed here from scratch."""
        hashes = self.a.block_hashes
        assert {k: b for b, k in hashes.items()} == self.a.hash_to_block and set(self.a.evictable) <= set(hashes)
        assert set(hashes).isdisjoint(self.a.free_ids) and (self.caching or not hashes)
        for block, key in hashes.items():
            content = self.owner[block]
            assert content is not None and len(content) % self.bs == 0 and content
            assert self.memory[block] == list(content[-self.bs:])
            assert chain_keys(list(content), self.bs)[-1] == key

    @invariant()
    def stats_are_exact(self):
        refs = Counter(b for s in self.tokens for b in self.a.block_table(s))
        st_ = self.a.stats()
        assert (st_.used_blocks, st_.free_blocks) == (len(refs), self.n - len(refs))
        assert (st_.cached_blocks, st_.evictable_blocks) == (len(self.a.block_hashes), len(self.a.evictable))
        assert st_.logical_tokens == sum(map(len, self.tokens.values()))
        assert st_.saved_blocks == sum(refs.values()) - len(refs)
        stored = {self.a.slot(s, i) for s, tokens in self.tokens.items() for i in range(len(tokens))}
        assert st_.stored_tokens == len(stored)
        slots = len(refs) * self.bs
        assert st_.waste_pct == pytest.approx(100 * (slots - len(stored)) / slots if slots else 0.0)
        c = self.counts
        assert (st_.prefix_query_blocks, st_.prefix_hit_blocks, st_.prefix_saved_blocks, st_.evictions) == (
            c["queries"], c["hits"], c["live_hits"], c["evictions"])
        assert st_.prefix_hit_pct == pytest.approx(100 * c["hits"] / c["queries"] if c["queries"] else 0.0)
        for s in self.tokens:
            assert self.a.cached_prefix(s) % self.bs == 0

    def teardown(self):
        if not hasattr(self, "a"):
            return
        for seq in list(self.tokens):
            self.a.free(seq)
        assert sorted(list(self.a.free_ids) + list(self.a.evictable)) == list(range(self.n))
        assert self.a.ref_counts == [0] * self.n and not self.a.used_ids and self.a.take_copies() == []
        assert set(self.a.evictable) == set(self.a.block_hashes)


def test_allocator_state_machine_10k_steps():
    """At least 10,000 steps with prefix caching on (and more with it off), in under a minute on a CPU."""
    STEPS.clear()
    EVENTS.clear()
    run_state_machine_as_test(AllocatorMachine, settings=settings(
        max_examples=MACHINE_EXAMPLES, stateful_step_count=MACHINE_STEPS, deadline=None))
    total = sum(STEPS.values()) - STEPS["with prefix caching"]
    print(f"allocator state machine: {total} steps {dict(STEPS)}; {dict(EVENTS)}")
    assert STEPS["with prefix caching"] >= 10_000, dict(STEPS)
    assert min(EVENTS[e] for e in ("copy-on-write", "copies applied", "allocate out of blocks", "append out of blocks",
                                   "prefix hits", "revived hits", "evictions", "blocks marked")) >= 100, dict(EVENTS)


# -- synthetic workloads

def test_synthetic_trace_waste_at_block_16_is_under_4_percent():
    rng = random.Random(0)
    lengths = [rng.randint(16, 784) for _ in range(256)]              # mean 400
    a = BlockAllocator(sum(-(-n // 16) for n in lengths), 16)
    for seq, n in enumerate(lengths):
        a.allocate(seq, rng.randint(1, n))                             # prompt, then decode round-robin
    while any(a.num_tokens(s) < n for s, n in enumerate(lengths)):
        for seq, n in enumerate(lengths):
            if a.num_tokens(seq) < n:
                a.append(seq)
    slots = sum(-(-n // 16) * 16 for n in lengths)
    s = a.stats()
    print(f"synthetic trace: mean length {sum(lengths) / len(lengths):.0f}, waste {s.waste_pct:.2f}%")
    assert 380 <= sum(lengths) / len(lengths) <= 420
    assert s.stored_tokens == sum(lengths) and s.free_blocks == 0
    assert s.waste_pct == pytest.approx(100 * (slots - sum(lengths)) / slots)
    assert s.waste_pct <= 4.0


def test_parallel_sampling_n4_shares_the_prompt():
    a = BlockAllocator(64, 16)
    a.allocate(0, 100)                      # 6 full blocks + 4 tokens in a 7th
    last = a.block_table(0)[-1]
    for child in (1, 2, 3):
        a.fork(0, child)
    for _ in range(50):                     # each sample generates 50 tokens: 150 tokens, 10 blocks
        for seq in range(4):
            a.append(seq)
    copies = a.take_copies()
    assert [src for src, _ in copies] == [last] * 3   # the first three writers copy; the last writes in place
    s = a.stats()
    # shared: 6 prompt blocks; own: blocks 7..10 of each sample -> 6 + 4 x 4 = 22, against 4 x 10 unshared
    assert (s.used_blocks, s.unshared_blocks, s.saved_blocks) == (22, 40, 18)
    assert s.saved_pct == pytest.approx(45.0)
    print(f"parallel sampling n=4: {s.summary()}")


def test_beam_forks_share_the_common_prefix():
    a = BlockAllocator(64, 16)
    a.allocate("root", 32)                  # 2 full blocks
    beams = ["root", "b1", "b2", "b3"]
    for b in beams[1:]:
        a.fork("root", b)
    for _ in range(8):                      # 40 tokens each: a block of 8 of its own (full blocks: no copy)
        for b in beams:
            a.append(b)
    assert a.take_copies() == []
    a.free("b2")                            # prune two beams, split the best one in three
    a.free("b3")
    a.fork("root", "b4")
    a.fork("root", "b5")
    beams = ["root", "b1", "b4", "b5"]
    for _ in range(8):                      # 48 tokens each: root's third block is shared by three beams
        for b in beams:
            a.append(b)
    assert len(a.take_copies()) == 2        # root and b4 copy it; b5, its last holder, writes in place
    s = a.stats()
    # shared: the 2 prompt blocks; own: each beam's third block -> 2 + 4 = 6, against 4 x 3 unshared
    assert (s.used_blocks, s.unshared_blocks, s.saved_blocks, s.saved_pct) == (6, 12, 6, 50.0)
    assert s.waste_pct == 0.0
    print(f"beam search, 4 beams: {s.summary()}")
