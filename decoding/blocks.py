"""Paged KV bookkeeping for one pool: fixed-size blocks, block tables, prefix hashing.

No tensors here: a `BlockPool` hands out block ids of a pool whose tensors the runner owns
(`decoding/runner.py`). A sequence's KV is a `KVSeq`: its block table (block ids in position
order), how many tokens it holds, and those tokens (for the prefix hashes).

Prefix caching (vLLM's automatic prefix caching): a block that is full gets a key, the hash of
(its predecessor's key, its tokens, the member that computed it), so one key names one exact
prefix of one model. A later sequence whose prompt starts with the same tokens takes those
blocks read-only (reference counted) instead of computing them. A block whose last reference
goes keeps its key and contents in an LRU queue of free-but-cached blocks; allocation takes a
never-cached free block first, then evicts the least recently used cached one.

Block 0 is the null block: it is never handed out, and table entries that hold nothing (the
padding of a table, blocks a sliding window let go) point at it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """The pool has no free block left (the scheduler preempts before this can happen)."""


@dataclass(eq=False)
class KVSeq:
    """One sequence's KV in one pool."""

    member: str  # what computes it, part of every block key (the weights' adapter)
    owner: str = ""  # the family entry holding it
    blocks: list[int] = field(default_factory=list)  # block table, position order
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is held, in order
    keys: list[int] = field(default_factory=list)  # keys of its leading full blocks
    dropped: int = 0  # leading blocks a sliding window let go (table entries now NULL_BLOCK)

    @property
    def length(self) -> int:
        return len(self.tokens)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("a KV pool needs at least 2 blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.key_of: dict[int, int] = {}  # block -> its prefix key (full, cached blocks)
        self.by_key: dict[int, int] = {}  # prefix key -> block
        # Free blocks: never cached (a stack, so the hottest memory is reused first), and
        # cached ones in LRU order (the oldest first out).
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()
        self.fresh: list[int] = []  # blocks handed out for the first time (to be zeroed)
        self.copies: list[tuple[int, int]] = []  # (source, target): copy-on-write, to be done
        self._ever = set()  # blocks handed out at least once

    # ------------------------------------------------------------------ counts

    @property
    def capacity(self) -> int:
        """Blocks that sequences can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (cached ones are evicted when needed)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def needed(self, seq: KVSeq, upto: int) -> int:
        """New blocks `seq` needs to hold `upto` tokens (a shared partial last block that it
        would write into counts: it gets a copy of its own first)."""
        return max(0, self.blocks_for(upto) - len(seq.blocks)) + self._cow(seq, upto)

    def _cow(self, seq: KVSeq, upto: int) -> int:
        """1 when writing up to `upto` would touch a block others share (the partial last block
        of forked siblings)."""
        at = seq.length // self.block_size
        if upto <= seq.length or at >= len(seq.blocks):
            return 0
        block = seq.blocks[at]
        return int(block != NULL_BLOCK and self.refs[block] > 1)

    def writable(self, seq: KVSeq, upto: int) -> bool:
        """Whether `seq` may write its tokens up to `upto` without a new block (the common
        decode step; what `needed(seq, upto) == 0` says, in fewer steps)."""
        n = len(seq.tokens)
        return upto <= len(seq.blocks) * self.block_size and (
            upto <= n or self.refs[seq.blocks[n // self.block_size]] == 1
        )

    # ------------------------------------------------------------------ allocation

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
        else:
            raise OutOfBlocks("the KV pool is full")
        if block not in self._ever:
            self._ever.add(block)
            self.fresh.append(block)
        self.refs[block] = 1
        return block

    def reserve(self, seq: KVSeq, upto: int) -> None:
        """Give `seq` blocks for `upto` tokens (all or none)."""
        need = self.needed(seq, upto)
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} blocks, {self.num_free} free")
        if self._cow(seq, upto):
            at = seq.length // self.block_size
            source, target = seq.blocks[at], self._take()
            self.refs[source] -= 1  # still held by the siblings
            seq.blocks[at] = target
            self.copies.append((source, target))
        while len(seq.blocks) < self.blocks_for(upto):
            seq.blocks.append(self._take())

    def _release(self, block: int) -> None:
        if block == NULL_BLOCK:
            return
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.key_of:
                self._cached[block] = None  # reusable by a later prefix until evicted
            else:
                self._free.append(block)

    def free(self, seq: KVSeq) -> None:
        # Tail first: the last blocks of a sequence are the least likely to be shared, so they
        # are evicted first (they enter the LRU queue first).
        for block in reversed(seq.blocks):
            self._release(block)
        seq.blocks, seq.tokens, seq.keys, seq.dropped = [], [], [], 0

    def fork(self, seq: KVSeq) -> KVSeq:
        """A sibling holding the same tokens, sharing every block; the partial last block is
        copied by whichever sibling writes into it first (`reserve`), so a fork takes no
        block and cannot fail."""
        child = KVSeq(seq.member, seq.owner, tokens=list(seq.tokens), keys=list(seq.keys),
                      dropped=seq.dropped)  # fmt: skip
        for block in seq.blocks:
            if block != NULL_BLOCK:
                self.refs[block] += 1
            child.blocks.append(block)
        return child

    def truncate(self, seq: KVSeq, length: int) -> None:
        """Keep the first `length` tokens (a speculative block's rejected tail goes); blocks
        past them are released, and a block that is no longer full loses its key."""
        if length >= seq.length:
            return
        del seq.tokens[length:]
        keep = self.blocks_for(length)
        for block in seq.blocks[keep:]:
            self._release(block)
        del seq.blocks[keep:]
        full = length // self.block_size
        for key in seq.keys[full:]:
            block = self.by_key.get(key)
            if block is not None and self.refs[block] > 0 and block in seq.blocks[full:]:
                del self.by_key[key]
                del self.key_of[block]
        del seq.keys[full:]

    def drop_before(self, seq: KVSeq, position: int) -> None:
        """Release the leading blocks that hold only tokens before `position` (a sliding
        window has moved past them); their table entries become the null block."""
        upto = min(position // self.block_size, len(seq.blocks))
        for i in range(seq.dropped, upto):
            self._release(seq.blocks[i])
            seq.blocks[i] = NULL_BLOCK
        seq.dropped = max(seq.dropped, upto)

    # ------------------------------------------------------------------ prefix cache

    def commit(self, seq: KVSeq) -> None:
        """Key the full blocks `seq` has computed since the last call (makes them findable)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.keys), seq.length // bs):
            block_tokens = seq.tokens[i * bs : (i + 1) * bs]
            if -1 in block_tokens:
                break  # ids still on the device (speculative drafts): keyed once rewritten
            parent = seq.keys[-1] if seq.keys else 0
            key = hash((parent, seq.member, tuple(block_tokens)))
            seq.keys.append(key)
            block = seq.blocks[i]
            if block == NULL_BLOCK or block in self.key_of or key in self.by_key:
                continue  # another block already holds this prefix; this one stays private
            self.key_of[block] = key
            self.by_key[key] = block

    def match(self, seq: KVSeq, tokens: list[int]) -> int:
        """Take the cached blocks of the longest cached prefix of `tokens` into the empty
        `seq`; returns the tokens they hold. At least one token is always left to compute
        (its logits are what the prompt is prefilled for)."""
        if not self.prefix_caching or seq.blocks:
            return 0
        bs = self.block_size
        parent = 0
        for i in range((len(tokens) - 1) // bs):
            block_tokens = tokens[i * bs : (i + 1) * bs]
            key = hash((parent, seq.member, tuple(block_tokens)))
            block = self.by_key.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self._cached[block]
            self.refs[block] += 1
            seq.blocks.append(block)
            seq.keys.append(key)
            seq.tokens.extend(block_tokens)
            parent = key
        return seq.length
