"""The paged KV block allocator: a fixed pool of blocks, a block table per sequence, reference counts, copy-on-write.

Physical memory is ``num_blocks`` blocks of ``block_size`` token slots; token ``i`` of a sequence lives in slot
``table[i // block_size] * block_size + i % block_size`` (the slot the K/V write kernel takes). Sequence ids are
chosen by the caller: any hashable (a request id, an int, a tuple).

Verbs come in pairs: ``can_allocate``/``allocate``, ``can_append``/``append``; then ``fork``, ``free``,
``take_copies`` and ``block_tables``. A verb that needs more blocks than are free raises ``OutOfBlocks`` and changes
nothing.

Copy-on-write: ``fork`` shares every block of the parent with the child. Appending to a sequence whose last block is
shared and partly filled first moves that sequence to a fresh block and records the copy (src, dst); appending when
the last block is full takes a new block and needs no copy, even if earlier blocks are shared.

One decode step on the GPU, in this order:
  1. ``allocate``/``append`` for the step's tokens, keeping the returned slots;
  2. ``take_copies()`` and apply them, e.g. ``cache[dst] = cache[src]`` with index tensors (every source is read
     before any destination is written; applying them one by one in the order given is also correct);
  3. write the step's new K/V into the slots.
``fork`` a sequence only once the K/V of all its tokens is written (between steps, after sampling): the copies read
the blocks the child shares.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable

DEFAULT_BLOCK_SIZE = 16


class OutOfBlocks(RuntimeError):
    """Not enough free blocks for the request; the allocator's state is unchanged."""

    def __init__(self, what: str, needed: int, free: int, total: int):
        super().__init__(f"{what}: needs {needed} free block(s), {free} of {total} free")
        self.needed, self.free, self.total = needed, free, total


@dataclass
class _Sequence:
    table: list[int]
    length: int


@dataclass(frozen=True)
class AllocatorStats:
    num_blocks: int
    block_size: int
    used_blocks: int
    free_blocks: int
    logical_tokens: int     # sum of the sequences' lengths
    stored_tokens: int      # distinct filled slots: a shared token counts once
    waste_pct: float        # empty slots of the used blocks (all in last blocks), % of their slots
    unshared_blocks: int    # blocks the sequences would hold if none were shared
    saved_blocks: int       # unshared_blocks - used_blocks
    saved_pct: float        # saved_blocks as % of unshared_blocks

    def summary(self) -> str:
        return (f"{self.used_blocks}/{self.num_blocks} blocks of {self.block_size} used, "
                f"{self.stored_tokens} tokens stored ({self.logical_tokens} logical), "
                f"waste {self.waste_pct:.2f}%, sharing saves {self.saved_blocks} blocks ({self.saved_pct:.1f}%)")


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


class BlockAllocator:
    """Paged KV blocks for many sequences. ``block_size``: explicit wins; else, given kv_heads, head_dim and dtype,
    the page size recommended from the paged kernel's winners on this GPU (``tunebench.runtime.dispatch.
    tuned_paged_block_size``, see runtime/pages.py; `tunebench pages` prints the table behind it); else 16.
    ``block_size_source`` says which: "explicit", "tuned" or "default"."""

    def __init__(self, num_blocks: int, block_size: int | None = None, *, kv_heads: int | None = None,
                 head_dim: int | None = None, dtype=None):
        block_size, source = _resolve_block_size(block_size, kv_heads, head_dim, dtype)
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r} ({source})")
        self.num_blocks, self.block_size, self.block_size_source = num_blocks, block_size, source
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.used_ids: set[int] = set()
        self._seqs: dict[Hashable, _Sequence] = {}
        self._copies: dict[int, int] = {}   # pending copy-on-write, dst -> src, in the order made

    # -- blocks

    def _allocate_block(self) -> int:
        assert self.free_ids, "no free block"
        block = self.free_ids.popleft()
        assert self.ref_counts[block] == 0 and block not in self.used_ids, block
        self.ref_counts[block] = 1
        self.used_ids.add(block)
        return block

    def _free_block(self, block: int) -> None:
        assert self.ref_counts[block] > 0 and block in self.used_ids, block
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.used_ids.remove(block)
            self.free_ids.append(block)
            self._copies.pop(block, None)   # its owner is gone: nobody reads the copy

    def _require(self, what: str, needed: int) -> None:
        if needed > len(self.free_ids):
            raise OutOfBlocks(what, needed, len(self.free_ids), self.num_blocks)

    def _slot(self, seq: _Sequence, position: int) -> int:
        return seq.table[position // self.block_size] * self.block_size + position % self.block_size

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- sequences

    def can_allocate(self, prompt_len: int) -> bool:
        return self.blocks_for(prompt_len) <= len(self.free_ids)

    def allocate(self, seq_id: Hashable, prompt_len: int) -> list[int]:
        """Blocks for a new sequence's prompt (0 tokens is allowed). Returns the prompt tokens' slots."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 0:
            raise ValueError(f"prompt_len must be an integer >= 0, got {prompt_len!r}")
        self._require(f"allocate {seq_id!r} ({prompt_len} tokens)", self.blocks_for(prompt_len))
        seq = _Sequence([self._allocate_block() for _ in range(self.blocks_for(prompt_len))], prompt_len)
        self._seqs[seq_id] = seq
        return [self._slot(seq, i) for i in range(prompt_len)]

    def _append_needs(self, seq: _Sequence) -> int:
        if seq.length % self.block_size == 0:
            return 1                                   # last block full (or none yet): a new block
        return 1 if self.ref_counts[seq.table[-1]] > 1 else 0   # shared, partly filled: a copy

    def can_append(self, seq_id: Hashable) -> bool:
        return self._append_needs(self._get(seq_id)) <= len(self.free_ids)

    def append(self, seq_id: Hashable) -> int:
        """Room for one more token; returns its slot. May record a copy: see ``take_copies``."""
        seq = self._get(seq_id)
        self._require(f"append to {seq_id!r}", self._append_needs(seq))
        if seq.length % self.block_size == 0:
            seq.table.append(self._allocate_block())
        elif self.ref_counts[seq.table[-1]] > 1:
            seq.table[-1] = self._copy_on_write(seq.table[-1])
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
        """The child shares all of the parent's blocks. Needs no free block."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        for block in parent.table:
            assert self.ref_counts[block] > 0, block
            self.ref_counts[block] += 1
        self._seqs[child_id] = _Sequence(list(parent.table), parent.length)

    def free(self, seq_id: Hashable) -> None:
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
            num_blocks=self.num_blocks, block_size=self.block_size, used_blocks=used, free_blocks=len(self.free_ids),
            logical_tokens=sum(seq.length for seq in self._seqs.values()), stored_tokens=stored,
            waste_pct=100.0 * (slots - stored) / slots if slots else 0.0,
            unshared_blocks=unshared, saved_blocks=unshared - used,
            saved_pct=100.0 * (unshared - used) / unshared if unshared else 0.0)
