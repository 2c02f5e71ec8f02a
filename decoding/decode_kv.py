"""The decode rows' keys and values kept contiguous from one decode step to the next (CPU).

Without a paged kernel (on a CPU), a decode step attends each row to keys gathered from its
blocks: every layer copies every row's whole context, every step, which made a CPU decode step
a few percent slower than the contiguous cache the block pool replaced. While the same rows
decode step after step, that copy is the previous step's plus one token per row, so
`DecodeKV` keeps it: per layer, keys and values `[rows, capacity, kv_heads, head_dim]` indexed
by (row, position). It is gathered from the blocks when the rows change or outgrow it, and
otherwise each step's new token is written into it next to the pool write.

It also serves a step where prompts join, when its single-token rows are exactly the rows it
holds (the prompts' chunks belong to other sequences); while rows change every step, as when a
burst of prompts arrives, those steps gather per layer instead. The runner drops it (`drop`)
whenever a held sequence changes any other way: a longer run written into it (a verify
block), a truncation, a failed step; new or freed rows make a new set of rows, which gathers
anew. So what attention reads is always what a gather would give.

CPU only: on CUDA the varlen kernel reads the blocks in place, and a copy of every layer's
context would take memory the KV budget does not count. Bounded: the runner sizes its `limit`
(a quarter of the pool's bytes); rows needing more gather per layer as before. Each layer's
storage is allocated once, at that bound, the first time it is gathered, and every gather
uses its start: no allocation in a step, and (like the pool's) its pages are only touched as
far as the widest batch has used it, so the server's memory settles instead of rising and
falling with the batch.
"""

from __future__ import annotations

import torch


class DecodeKV:
    def __init__(self, shapes: list[tuple[int, int, torch.dtype]], block_size: int, limit: int):
        """`shapes`: each layer's (kv_heads, head_dim, dtype); `limit`: most bytes to hold."""
        self.block_size = block_size
        self.limit = limit
        token_bytes = sum(2 * h * d * torch.empty((), dtype=t).element_size() for h, d, t in shapes)
        self.max_tokens = limit // token_bytes  # rows x capacity, over every layer within `limit`
        self.rows: tuple[int, ...] | None = None  # the handles whose keys it holds, in order
        self.capacity = 0  # tokens per row
        self.width = 0  # tokens attended this step: the longest row's
        self._k: list[torch.Tensor | None] = [None] * len(shapes)  # storage per layer, flat
        self._v: list[torch.Tensor | None] = [None] * len(shapes)
        self._views: list = [None] * len(shapes)  # per layer: (K, V) as (flat, per row)
        self._masks: dict = {}  # (window, dtype) -> additive mask [rows, capacity]

    def drop(self) -> None:
        self.rows = None
        self._masks = {}

    def begin(self, rows: tuple[int, ...], longest: int) -> int | None:
        """A decode step of `rows` (handles), the longest of which holds `longest` tokens after
        it: 0 when the held keys carry on (write the new tokens), the table width in blocks to
        gather at (the rows changed or outgrew the capacity), or None when that would pass
        the limit (gather per layer, as without it)."""
        self.width = longest
        if rows == self.rows and longest <= self.capacity:
            return 0
        blocks = -(-longest // self.block_size)
        blocks += max(2, blocks // 4)  # room to grow before the next gather
        if len(rows) * blocks * self.block_size > self.max_tokens:
            self.rows = None
            return None
        self.rows, self.capacity = rows, blocks * self.block_size
        self._masks = {}
        return blocks

    def write_index(self, positions: list[int]) -> list[int]:
        """Where each held row's token at `positions` goes in the flat storage."""
        return [i * self.capacity + p for i, p in enumerate(positions)]

    def read(self, layer: int, k_pool: torch.Tensor, v_pool: torch.Tensor,
             k_new: torch.Tensor, v_new: torch.Tensor, tables: torch.Tensor | None,
             index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Layer `layer`'s keys and values of the held rows, `[rows, kv_heads, width, dim]`,
        after this step's new tokens (`k_new`/`v_new` `[rows, kv_heads, dim]`, already in the
        pool): gathered through `tables` `[rows, blocks]` (padded with the null block, which
        holds zeros) on a gathering step, else written at `index` (row * capacity +
        position)."""
        if tables is not None:
            self._views[layer] = (self._gather(self._k, layer, k_pool, tables),
                                  self._gather(self._v, layer, v_pool, tables))  # fmt: skip
        (k_flat, k), (v_flat, v) = self._views[layer]
        if tables is None:
            k_flat.index_copy_(0, index, k_new)
            v_flat.index_copy_(0, index, v_new)
        return k[:, : self.width].transpose(1, 2), v[:, : self.width].transpose(1, 2)

    def _gather(self, store: list, layer: int, pool: torch.Tensor, tables: torch.Tensor):
        """The rows' blocks of `pool` copied into the start of this layer's storage; returns
        them viewed as `[rows * capacity, kv_heads, dim]` and `[rows, capacity, ...]`."""
        per_token = pool.shape[2] * pool.shape[3]
        if store[layer] is None:
            store[layer] = pool.new_empty(self.max_tokens * per_token)
        x = store[layer][: len(self.rows) * self.capacity * per_token]
        torch.index_select(pool, 0, tables.flatten(), out=x.view(-1, *pool.shape[1:]))
        return x.view(-1, *pool.shape[2:]), x.view(len(self.rows), self.capacity, *pool.shape[2:])

    def mask(self, key: tuple, build, index: torch.Tensor | None) -> torch.Tensor:
        """The decode rows' additive mask `[rows, capacity]` for `key` (window, dtype), kept
        like the keys: `build()` at a gathering step, then each step only the new tokens'
        keys (`index`) unmasked. A sliding window also masks a key each step: rebuilt."""
        m = self._masks.get(key)
        if m is None or index is None or key[0] is not None:
            m = self._masks[key] = build()
        else:
            m.view(-1).index_fill_(0, index, 0)
        return m
