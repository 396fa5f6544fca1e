"""The paged KV block allocator: a fixed pool of blocks, a block table per sequence, reference counts, copy-on-write,
and (optionally) automatic prefix caching.

Physical memory is ``num_blocks`` blocks of ``block_size`` token slots; token ``i`` of a sequence lives in slot
``table[i // block_size] * block_size + i % block_size`` (the slot the K/V write kernel takes). Sequence ids are
chosen by the caller: any hashable (a request id, an int, a tuple). The block size is one the paged kernels support
(``tunebench.shapes.PAGES``, 8..128).

Verbs come in pairs: ``can_allocate``/``allocate``, ``can_append``/``append``; then ``fork``, ``free``,
``take_copies`` and ``block_tables``. A verb that needs more blocks than are available raises ``OutOfBlocks`` and
changes nothing.

Copy-on-write: ``fork`` shares every block of the parent with the child. Appending to a sequence whose last block is
shared and partly filled first moves that sequence to a fresh block and records the copy (src, dst); appending when
the last block is full takes a new block and needs no copy, even if earlier blocks are shared.

Prefix caching (``prefix_caching=True``, vLLM's automatic prefix caching): a full block is named by a hash of its
tokens chained with the hash of the blocks before it. ``allocate(seq, n, tokens=...)`` shares the leading full blocks
of the prompt that are cached (their count goes up) instead of taking new ones; ``cached_prefix(seq)`` says how many
prompt tokens that covers, and the caller computes K/V from there. At least the prompt's last token is always left to
compute (its logits are needed), so the block holding it is never shared from the cache: a prompt of exactly k full
blocks that are all cached shares k - 1 of them and recomputes the last block (no copy-on-write needed). A block is
registered in the cache only once ``mark_computed`` says its K/V is written, so no request finds a block before
it is computed. A cached block whose count drops to zero stays cached (it still counts as available): fresh blocks
come from the free list first, and only when that is empty is the least recently used cached block evicted. Freeing
a sequence releases its blocks last first, so a prompt's tail is evicted before its head.

One decode step on the GPU, in this order:
  1. ``allocate``/``append`` for the step's tokens, keeping the returned slots (with prefix caching, write only the
     prompt slots from ``cached_prefix(seq)`` on: the ones before it hold shared K/V);
  2. ``take_copies()`` and apply them, e.g. ``cache[dst] = cache[src]`` with index tensors (every source is read
     before any destination is written; applying them one by one in the order given is also correct);
  3. write the step's new K/V into the slots, then ``mark_computed`` (prefix caching).
``fork`` a sequence only once the K/V of all its tokens is written (between steps, after sampling): the copies read
the blocks the child shares.
"""
from __future__ import annotations

import hashlib
import operator
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

from ..shapes import DEFAULT_PAGE, PAGES

DEFAULT_BLOCK_SIZE = DEFAULT_PAGE


class OutOfBlocks(RuntimeError):
    """Not enough available blocks for the request; the allocator's state is unchanged."""

    def __init__(self, what: str, needed: int, free: int, total: int):
        super().__init__(f"{what}: needs {needed} free block(s), {free} of {total} free")
        self.needed, self.free, self.total = needed, free, total


def block_hash(tokens: Sequence[int], prefix: bytes | None) -> bytes:
    """The cache key of a full block: SHA-256 of the previous block's key (None for the first block) and this
    block's token ids. A collision would share wrong K/V in silence, so it is a cryptographic hash, not hash()."""
    h = hashlib.sha256(prefix if prefix is not None else b"root")
    h.update(repr(tuple(tokens)).encode())
    return h.digest()


@dataclass
class _Sequence:
    table: list[int]
    length: int
    tokens: list[int] = field(default_factory=list)   # its leading token ids known (prefix caching); <= length
    hashes: list[bytes] = field(default_factory=list)  # block_hash of each full block of `tokens`, as far as needed
    cached: int = 0        # leading prompt tokens found in the cache at allocate
    computed: int = 0      # positions whose K/V the caller has written (mark_computed)
    registered: int = 0    # leading blocks whose hash is settled: found in the cache, or offered to it


@dataclass(frozen=True)
class AllocatorStats:
    num_blocks: int
    block_size: int
    used_blocks: int
    free_blocks: int        # blocks no sequence holds: empty ones plus evictable cached ones
    logical_tokens: int     # sum of the sequences' lengths
    stored_tokens: int      # distinct filled slots: a shared token counts once
    waste_pct: float        # empty slots of the used blocks (all in last blocks), % of their slots
    unshared_blocks: int    # blocks the sequences would hold if none were shared
    saved_blocks: int       # unshared_blocks - used_blocks (forks and prefix hits alike)
    saved_pct: float        # saved_blocks as % of unshared_blocks
    prefix_caching: bool = False
    cached_blocks: int = 0          # blocks registered in the prefix cache, held or not
    evictable_blocks: int = 0       # cached blocks no sequence holds (part of free_blocks)
    prefix_query_blocks: int = 0    # full prompt blocks looked up since creation (all but the last token's)
    prefix_hit_blocks: int = 0      # of those, found in the cache: K/V not computed again
    prefix_hit_pct: float = 0.0     # prefix_hit_blocks as % of prefix_query_blocks
    prefix_saved_blocks: int = 0    # hits on a block another sequence held then: memory not taken twice
    evictions: int = 0              # cached blocks reused for other content, least recently used first

    def summary(self) -> str:
        text = (f"{self.used_blocks}/{self.num_blocks} blocks of {self.block_size} used, "
                f"{self.stored_tokens} tokens stored ({self.logical_tokens} logical), "
                f"waste {self.waste_pct:.2f}%, sharing saves {self.saved_blocks} blocks ({self.saved_pct:.1f}%)")
        if self.prefix_caching:
            text += (f"; prefix cache: {self.prefix_hit_blocks}/{self.prefix_query_blocks} blocks hit "
                     f"({self.prefix_hit_pct:.1f}%), {self.prefix_saved_blocks} shared live, "
                     f"{self.cached_blocks} cached ({self.evictable_blocks} evictable), {self.evictions} evicted")
        return text


def _resolve_block_size(block_size, kv_heads, head_dim, dtype) -> tuple[int, str]:
    """(block size, where it came from): explicit, else the page size recommended from this GPU's paged winners
    (runtime/pages.py: predicted decode time over the tuned decode buckets, weighed with the waste of last blocks),
    else the default."""
    if block_size is not None:
        return block_size, "explicit"
    geometry = (kv_heads, head_dim, dtype)
    if all(g is None for g in geometry):
        return DEFAULT_BLOCK_SIZE, "default"
    if any(g is None for g in geometry):
        raise ValueError("give all of kv_heads, head_dim and dtype (to look up the tuned block size) or none")
    from .kvcache import dtype_name
    try:
        from tunebench.runtime.dispatch import tuned_paged_block_size
    except ImportError as e:
        if e.name != "tunebench.runtime.dispatch":  # a broken dispatcher is an error, not a reason to fall back
            raise
        return DEFAULT_BLOCK_SIZE, "default"
    tuned = tuned_paged_block_size(kv_heads, head_dim, dtype_name(dtype))
    if tuned is None:
        return DEFAULT_BLOCK_SIZE, "default"
    return tuned, "tuned"


def _count(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _token(value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"a token id must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"a token id must be an integer, got {value!r}") from None


class BlockAllocator:
    """Paged KV blocks for many sequences. ``block_size``: explicit wins; else, given kv_heads, head_dim and dtype,
    the page size recommended from the paged kernel's winners on this GPU (``tunebench.runtime.dispatch.
    tuned_paged_block_size``, see runtime/pages.py; `tunebench pages` prints the table behind it); else 16.
    ``block_size_source`` says which: "explicit", "tuned" or "default". Either way it must be one of the page sizes
    the paged kernels support, ``tunebench.shapes.PAGES``. ``prefix_caching``: share cached prompt prefixes across
    requests (see the module docstring); ``allocate`` then needs the prompt's token ids."""

    def __init__(self, num_blocks: int, block_size: int | None = None, *, kv_heads: int | None = None,
                 head_dim: int | None = None, dtype=None, prefix_caching: bool = False):
        block_size, source = _resolve_block_size(block_size, kv_heads, head_dim, dtype)
        _count("num_blocks", num_blocks, 1)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in PAGES:
            raise ValueError(f"block_size must be a page size the paged kernels support, one of {PAGES} "
                             f"(tunebench.shapes.PAGES), got {block_size!r} ({source})")
        if not isinstance(prefix_caching, bool):
            raise ValueError(f"prefix_caching must be a bool, got {prefix_caching!r}")
        self.num_blocks, self.block_size, self.block_size_source = num_blocks, block_size, source
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))    # empty blocks
        self.used_ids: set[int] = set()
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks of count 0, least recently used first
        self.block_hashes: dict[int, bytes] = {}                 # cached block -> its key
        self.hash_to_block: dict[bytes, int] = {}
        self._seqs: dict[Hashable, _Sequence] = {}
        self._copies: dict[int, int] = {}   # pending copy-on-write, dst -> src, in the order made
        self._queries = self._hits = self._live_hits = self._evictions = 0

    # -- blocks

    @property
    def available(self) -> int:
        """Blocks a verb may take: the empty ones, then the evictable cached ones."""
        return len(self.free_ids) + len(self.evictable)

    def _allocate_block(self) -> int:
        if self.free_ids:
            block = self.free_ids.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_hashes.pop(block)]
            self._evictions += 1
        assert self.ref_counts[block] == 0 and block not in self.used_ids and block not in self.block_hashes, block
        self.ref_counts[block] = 1
        self.used_ids.add(block)
        return block

    def _share_block(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.evictable[block]
            self.used_ids.add(block)
        self.ref_counts[block] += 1

    def _free_block(self, block: int) -> None:
        assert self.ref_counts[block] > 0 and block in self.used_ids, block
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.used_ids.remove(block)
            if block in self.block_hashes:
                self.evictable[block] = None          # the most recently used end
            else:
                self.free_ids.append(block)
            self._copies.pop(block, None)   # its owner is gone: nobody reads the copy

    def _require(self, what: str, needed: int, available: int | None = None) -> None:
        available = self.available if available is None else available
        if needed > available:
            raise OutOfBlocks(what, needed, available, self.num_blocks)

    def _slot(self, seq: _Sequence, position: int) -> int:
        return seq.table[position // self.block_size] * self.block_size + position % self.block_size

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def blocks_for(self, tokens: int) -> int:
        return -(-_count("a token count", tokens, 0) // self.block_size)

    # -- prefix cache

    def _hash(self, seq: _Sequence, i: int) -> bytes:
        """The key of the sequence's block i (its tokens must be known), computing the chain up to it once."""
        bs = self.block_size
        while len(seq.hashes) <= i:
            j = len(seq.hashes)
            seq.hashes.append(block_hash(seq.tokens[j * bs:(j + 1) * bs], seq.hashes[-1] if j else None))
        return seq.hashes[i]

    def _lookup(self, seq: _Sequence) -> list[int]:
        """The cached blocks that the prompt `seq.tokens` starts with, all but the block of its last token."""
        hits = []
        for i in range(max(seq.length - 1, 0) // self.block_size):
            block = self.hash_to_block.get(self._hash(seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def _prompt(self, prompt_len: int, tokens) -> _Sequence:
        """A record for a new prompt (no blocks yet), holding its token ids when prefix caching is on."""
        seq = _Sequence([], _count("prompt_len", prompt_len, 0))
        if tokens is not None:
            if hasattr(tokens, "tolist"):                  # a tensor or array: one copy, not an item() per token
                tokens = tokens.tolist()
            if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__"):
                raise ValueError(f"tokens must be a sequence of token ids, got {type(tokens).__name__}")
            if len(tokens) != prompt_len:
                raise ValueError(f"tokens has {len(tokens)} ids for a prompt of {prompt_len}")
            if self.prefix_caching:
                seq.tokens = [_token(t) for t in tokens]
        elif self.prefix_caching:
            raise ValueError("prefix_caching=True: allocate needs the prompt's token ids (tokens=...)")
        return seq

    def cached_prefix(self, seq_id: Hashable) -> int:
        """How many leading prompt tokens had their K/V in the cache at ``allocate`` (a multiple of block_size, less
        than the prompt). The caller computes the prompt from there."""
        return self._get(seq_id).cached

    def mark_computed(self, seq_id: Hashable, num_tokens: int) -> None:
        """The caller has written the K/V of the sequence's positions < num_tokens. Its full blocks among them whose
        tokens are known enter the prefix cache (a block whose content is cached already in another block stays
        uncached: both hold the same K/V, and the one in the cache keeps serving hits)."""
        seq = self._get(seq_id)
        if _count("num_tokens", num_tokens, 0) > seq.length:
            raise ValueError(f"num_tokens {num_tokens} is past sequence {seq_id!r} of {seq.length} tokens")
        seq.computed = max(seq.computed, num_tokens)
        if not self.prefix_caching:
            return
        for i in range(seq.registered, min(seq.computed, len(seq.tokens)) // self.block_size):
            block, key = seq.table[i], self._hash(seq, i)
            assert self.block_hashes.get(block, key) == key, (block, i)
            if key not in self.hash_to_block:
                self.hash_to_block[key], self.block_hashes[block] = block, key
            seq.registered = i + 1

    # -- sequences

    def can_allocate(self, prompt_len: int, *, tokens: Sequence[int] | None = None) -> bool:
        """Whether ``allocate`` would succeed. Given the prompt's tokens (prefix caching), its cache hits count."""
        blocks = self.blocks_for(_count("prompt_len", prompt_len, 0))
        seq = self._prompt(prompt_len, tokens) if tokens is not None else None
        hits = self._lookup(seq) if seq is not None and self.prefix_caching else []
        revived = sum(self.ref_counts[b] == 0 for b in hits)
        return blocks - len(hits) <= self.available - revived

    def allocate(self, seq_id: Hashable, prompt_len: int, *, tokens: Sequence[int] | None = None) -> list[int]:
        """Blocks for a new sequence's prompt (0 tokens is allowed). Returns the slots of all the prompt's tokens.
        With prefix caching, ``tokens`` (prompt_len token ids) is required, and leading cached blocks are shared:
        see ``cached_prefix``."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        seq = self._prompt(prompt_len, tokens)
        hits = self._lookup(seq) if self.prefix_caching else []
        revived = sum(self.ref_counts[b] == 0 for b in hits)
        needed = self.blocks_for(prompt_len) - len(hits)
        self._require(f"allocate {seq_id!r} ({prompt_len} tokens)", needed, self.available - revived)
        if self.prefix_caching:
            self._queries += max(prompt_len - 1, 0) // self.block_size
            self._hits += len(hits)
            self._live_hits += len(hits) - revived
        for block in hits:                                 # before allocating: eviction must not take them
            self._share_block(block)
        seq.table = hits + [self._allocate_block() for _ in range(needed)]
        seq.registered, seq.cached = len(hits), len(hits) * self.block_size
        seq.computed = seq.cached
        self._seqs[seq_id] = seq
        return [self._slot(seq, i) for i in range(prompt_len)]

    def _append_needs(self, seq: _Sequence) -> int:
        if seq.length % self.block_size == 0:
            return 1                                   # last block full (or none yet): a new block
        return 1 if self.ref_counts[seq.table[-1]] > 1 else 0   # shared, partly filled: a copy

    def can_append(self, seq_id: Hashable) -> bool:
        return self._append_needs(self._get(seq_id)) <= self.available

    def append(self, seq_id: Hashable, token: int | None = None) -> int:
        """Room for one more token; returns its slot. May record a copy: see ``take_copies``. With prefix caching,
        the token's id lets the blocks that decode fills enter the cache too; a token appended without one ends
        what the sequence can offer to the cache."""
        seq = self._get(seq_id)
        token = None if token is None else _token(token)
        self._require(f"append to {seq_id!r}", self._append_needs(seq))
        if seq.length % self.block_size == 0:
            seq.table.append(self._allocate_block())
        elif self.ref_counts[seq.table[-1]] > 1:
            seq.table[-1] = self._copy_on_write(seq.table[-1])
        if self.prefix_caching and token is not None and len(seq.tokens) == seq.length:
            seq.tokens.append(token)
        seq.length += 1
        return self._slot(seq, seq.length - 1)

    def _copy_on_write(self, src: int) -> int:
        dst = self._allocate_block()
        self._free_block(src)                          # the other sharers keep it
        assert self.ref_counts[src] > 0
        self._copies[dst] = src
        return dst

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies recorded since the last call, to apply before writing new tokens' K/V.
        Destinations are distinct."""
        copies = [(src, dst) for dst, src in self._copies.items()]
        self._copies.clear()
        return copies

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares all of the parent's blocks (and its tokens, for the prefix cache). Needs no free block."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        for block in parent.table:
            assert self.ref_counts[block] > 0, block
            self.ref_counts[block] += 1
        self._seqs[child_id] = _Sequence(list(parent.table), parent.length, list(parent.tokens), list(parent.hashes),
                                         parent.cached, parent.computed, parent.registered)

    def free(self, seq_id: Hashable) -> None:
        """Releases the sequence's blocks, last first: cached ones stay cached, the tail least recently used."""
        seq = self._get(seq_id)
        for block in reversed(seq.table):
            self._free_block(block)
        del self._seqs[seq_id]

    # -- views

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    @property
    def sequences(self) -> list[Hashable]:
        return list(self._seqs)

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).table)

    def slot(self, seq_id: Hashable, position: int) -> int:
        seq = self._get(seq_id)
        if not 0 <= position < seq.length:
            raise IndexError(f"position {position} outside sequence {seq_id!r} of {seq.length} tokens")
        return self._slot(seq, position)

    def block_tables(self, seq_ids: Iterable[Hashable], device="cpu", width: int | None = None):
        """int32 [B, width] block tables (width: the longest table by default). Rows are padded with block 0, a real
        block id: the kernel reads only the first ceil(context_len / block_size) entries of a row."""
        import torch
        tables = [self._get(s).table for s in seq_ids]
        longest = max((len(t) for t in tables), default=0)
        width = longest if width is None else width
        if width < longest:
            raise ValueError(f"width {width} is shorter than the longest block table ({longest})")
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width).to(device)

    def context_lens(self, seq_ids: Iterable[Hashable], device="cpu"):
        """int32 [B] token counts, the kernel's context_lens."""
        import torch
        return torch.tensor([self._get(s).length for s in seq_ids], dtype=torch.int32, device=device)

    def stats(self) -> AllocatorStats:
        filled: dict[int, int] = {}   # block -> filled slots, the same for every sharer (a shared block is frozen)
        for seq in self._seqs.values():
            for i, block in enumerate(seq.table):
                n = min(self.block_size, seq.length - i * self.block_size)
                assert filled.setdefault(block, n) == n, (block, n, filled[block])
        used = len(self.used_ids)
        stored = sum(filled.values())
        unshared = sum(len(seq.table) for seq in self._seqs.values())
        slots = used * self.block_size
        return AllocatorStats(
            num_blocks=self.num_blocks, block_size=self.block_size, used_blocks=used, free_blocks=self.available,
            logical_tokens=sum(seq.length for seq in self._seqs.values()), stored_tokens=stored,
            waste_pct=100.0 * (slots - stored) / slots if slots else 0.0,
            unshared_blocks=unshared, saved_blocks=unshared - used,
            saved_pct=100.0 * (unshared - used) / unshared if unshared else 0.0,
            prefix_caching=self.prefix_caching, cached_blocks=len(self.block_hashes),
            evictable_blocks=len(self.evictable), prefix_query_blocks=self._queries, prefix_hit_blocks=self._hits,
            prefix_hit_pct=100.0 * self._hits / self._queries if self._queries else 0.0,
            prefix_saved_blocks=self._live_hits, evictions=self._evictions)
