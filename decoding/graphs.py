"""Plain decode steps of one runner replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of `b` rows runs the graph of the smallest bucket >= `b`. Everything the graph
reads lives in persistent buffers of that bucket's size, refilled on the device before each
replay: token ids, positions, slot mapping, block tables padded to the longest table the pool
can hold (`width` blocks), and, for the varlen kernel, KV lengths. The `b..bucket` padding rows
sit at position 0 of the null block: they write their key there and attend to it alone, so they
touch no sequence's KV and every softmax stays finite; their logits are dropped.

What cannot change between replays is fixed at capture: the shapes (bucket, width), the
varlen kernel's `max_k` (width x block size, an upper bound of every row's length) and the
decode mask, which is computed inside the graph from the position buffer.

`capture=False` runs the same forward over the same buffers eagerly (no graph): that is how
the buffers and the padding are tested on a CPU; on a CUDA device it is only a fallback.
`ModelRunner.enable_graphs` checks the replay against its eager decode before using it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from . import attention
from .attention import StepBatch

if TYPE_CHECKING:
    from .runner import ModelRunner

log = logging.getLogger(__name__)


def buckets_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, then of 16: padding stays under 2x for small
    batches and under 25% beyond 32 (vLLM's capture sizes are shaped alike)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16)
    return [*out, max_batch]


class DecodeGraphs:
    """A runner's captured decode forwards (see the module's docstring)."""

    def __init__(self, runner: ModelRunner, max_batch: int, width: int, capture: bool):
        self.runner = runner
        self.buckets = buckets_up_to(max_batch)
        self.width = width
        n, dev = self.buckets[-1], runner.device
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, width, dtype=torch.long, device=dev)
        # The varlen kernel's int32 copies (KV lengths of padding rows: their one key).
        self.kv_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables32 = torch.zeros(n, width, dtype=torch.int32, device=dev)
        self.cu_q = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        # bucket -> (its graph, None without capture; its layout; its output logits)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, StepBatch, Any]] = {}
        for b in reversed(self.buckets):  # largest first: the smaller ones reuse its memory
            self._capture(b)

    def bucket(self, b: int) -> int | None:
        return next((n for n in self.buckets if n >= b), None)

    def _batch(self, n: int) -> StepBatch:
        r = self.runner
        batch = StepBatch(
            block_size=r.pool.block_size, slot_mapping=self.slots[:n],
            decode_index=self.pos[:0], decode_tables=self.tables[:n],
            decode_positions=self.pos[:n], chunks=[], group=None, all_decode=True,
            windows=r.windows, pools=r.kv, slots=r.kv_slots,
        )  # fmt: skip
        if r.use_varlen:
            batch.cu_q, batch.seq_lens = self.cu_q[: n + 1], self.kv_lens[:n]
            batch.tables = self.tables32[:n]
            batch.max_q, batch.max_k = 1, self.width * r.pool.block_size
        return batch

    def _forward(self, batch: StepBatch, n: int) -> torch.Tensor:
        batch._masks.clear()  # built from the position buffer inside the forward (and graph)
        with self.runner._paged(), attention.activated(batch):
            return self.runner._call(
                None, input_ids=self.ids[:n].unsqueeze(0), position_ids=self.pos[:n].unsqueeze(0),
                logits_to_keep=0,
            ).logits[0]  # fmt: skip

    def _capture(self, n: int) -> None:
        batch = self._batch(n)
        if not self.capture:
            self.graphs[n] = (None, batch, None)
            return
        # Warm up on a side stream (lazy initialisations, library workspaces) before capture:
        # the buffers are all zero, so these forwards only write the null block.
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(batch, n)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(batch, n)
        self.graphs[n] = (graph, batch, out)

    def run(self, ids: torch.Tensor, dev: dict[str, torch.Tensor], b: int, width: int):
        """Logits [b, V] of one decode step of `b` rows: `ids` [b] on the device, `dev` the
        step's uploaded layout (pos, smap, tables [b * width])."""
        n = self.bucket(b)
        self.ids[:b].copy_(ids)
        self.pos[:b].copy_(dev["pos"])
        self.slots[:b].copy_(dev["smap"])
        self.tables[:n].zero_()
        self.tables[:b, :width].copy_(dev["tables"].view(b, width))
        if n > b:
            self.ids[b:n].zero_()
            self.pos[b:n].zero_()
            self.slots[b:n].zero_()
        graph, batch, out = self.graphs[n]
        if self.runner.use_varlen:
            self.kv_lens[:b].copy_(dev["pos"] + 1)  # a decode row holds its position + 1 keys
            self.kv_lens[b:n].fill_(1)
            self.tables32[:n].copy_(self.tables[:n])
        if graph is None:
            return self._forward(batch, n)[:b]
        graph.replay()
        # A copy: the next replay rewrites `out` while the caller may still hold these logits.
        return out[:b].clone()
