"""Attention over the paged KV pool, for one flattened forward of many sequences.

A runner's forward holds every token of its step in one row (`input_ids` [1, T]): the decode
tokens of the running sequences and the prompt chunks of those being prefilled, with no
padding. transformers runs the model unmodified; only its attention function is ours:
`paged_attention` is registered through transformers' public `AttentionInterface` under
`ATTENTION`, and the runner switches a module to it for its own forwards only. Since that name
has no mask function registered, transformers builds no attention mask at all; the function
reads the step's layout from the `StepBatch` the runner activates around the forward.

Each layer's call:
1. writes the step's new keys and values into the pool at `slot_mapping` (block * size +
   offset of every token);
2. attends each sequence's queries to its keys, read through its block table:
   - on CUDA, one call to a varlen paged kernel when the installed torch has one
     (`torch.nn.attention.varlen.varlen_attn` with a block table), chosen at start;
   - otherwise the exact path: the decode tokens of the step in one batched SDPA over their
     gathered blocks (a key mask per row: its length and window; on a CPU, a plain decode
     step reads them from the runner's `DecodeKV`, kept from the last step); short prompt chunks
     together in one padded SDPA, and each long one alone, with causal masks offset by what
     their sequences already hold.

A model that gives `softcap` (Gemma-2) runs the exact path's manual softmax; sliding-window
layers mask keys before `position - window + 1` (transformers' convention).

Also here: `Uploader`, which brings a step's layout to the device in one copy, and
`AttentionSwitch`, which runs a module with this attention for the runner's forwards only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .decode_kv import DecodeKV

log = logging.getLogger(__name__)

ATTENTION = "eft_paged"


@dataclass
class Chunk:
    """A run of more than one query token of one sequence (a prompt chunk, a verify block)."""

    start: int  # index of its first token in the flattened step
    length: int  # its tokens
    table: torch.Tensor  # [blocks] its block table (device)
    first: int  # position of its first token in the sequence


@dataclass
class Group:
    """Short multi-token runs of several sequences (prompt chunks of requests that arrived
    together), attended in one padded call: each run's queries padded to the longest with
    copies of its last query, whose outputs are dropped."""

    q_index: torch.Tensor  # [S * tmax] the step token each padded query reads
    positions: torch.Tensor  # [S, tmax] their positions in their sequences
    tables: torch.Tensor  # [S, nb] block tables, padded with the null block
    real: torch.Tensor  # [R] padded queries that are real tokens ...
    out_index: torch.Tensor  # [R] ... and the step tokens they answer for


@dataclass
class StepBatch:
    """Everything one flattened forward needs besides the token ids: built on the host, moved
    to the device in one copy. Plain tensors and ints, so it could be broadcast to the ranks of
    a tensor-parallel group as it is; `pools`, `slots` and `decode_kv` are the runner's own
    memory, which each rank would hold for its shard and set after the broadcast."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] where each token's KV goes
    # Single-token sequences (decode rows), attended in one batched call:
    decode_index: torch.Tensor  # [Bd] their tokens' indices in the step
    decode_tables: torch.Tensor | None  # [Bd, nb] block tables, padded with the null block
    decode_positions: torch.Tensor  # [Bd] their positions
    chunks: list[Chunk]  # long runs, one call each
    group: Group | None  # short runs, one call together
    all_decode: bool  # every token is a decode token, in step order (no scatter needed)
    windows: list[int | None]  # per layer (None: full attention)
    pools: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V [N, block, heads, dim]
    slots: list[tuple[torch.Tensor, torch.Tensor]]  # the same, [N * block, heads, dim]
    # For a varlen kernel: cumulative query lengths, each sequence's KV length and table.
    cu_q: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    tables: torch.Tensor | None = None
    max_q: int = 1
    max_k: int = 1
    # A plain decode step on the exact path may read the rows' keys from a `DecodeKV` kept
    # since the last step instead: gathered there through `decode_tables` when given, else
    # with this step's tokens written at `decode_kv_index` (row * capacity + position).
    decode_kv: DecodeKV | None = None
    decode_kv_index: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[Bd, 1, 1, nb * block] additive mask of the decode rows: their keys up to their own
        position (and within the window)."""
        key = ("decode", window, dtype)
        if key not in self._masks:
            kv = self.decode_kv
            width = kv.capacity if kv is not None else self.decode_tables.shape[1] * self.block_size
            pos = self.decode_positions

            def build() -> torch.Tensor:
                keys = torch.arange(width, device=pos.device)
                return _additive(keys, pos.unsqueeze(-1), window, dtype)

            if kv is not None:
                mask = kv.mask((window, dtype), build, self.decode_kv_index)[:, : kv.width]
            else:
                mask = build()
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def group_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[S, 1, tmax, nb * block] additive causal masks of the grouped runs."""
        key = ("group", window, dtype)
        if key not in self._masks:
            g = self.group
            keys = torch.arange(g.tables.shape[1] * self.block_size, device=g.tables.device)
            self._masks[key] = _additive(keys, g.positions.unsqueeze(-1), window, dtype)[:, None]
        return self._masks[key]

    def chunk_mask(self, i: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[1, 1, t, nb * block] additive causal mask of chunk `i`, offset by what precedes
        it in its sequence."""
        key = (i, window, dtype)
        if key not in self._masks:
            c = self.chunks[i]
            width = c.table.shape[0] * self.block_size
            keys = torch.arange(width, device=c.table.device)
            pos = torch.arange(c.first, c.first + c.length, device=c.table.device).unsqueeze(-1)
            self._masks[key] = _additive(keys, pos, window, dtype)[None, None]
        return self._masks[key]


def _additive(keys, pos, window, dtype) -> torch.Tensor:
    """0 where a query at `pos` may attend to `keys`, the dtype's lowest value elsewhere (an
    additive mask: SDPA's fast path on CPU; never -inf, so no row can turn NaN)."""
    ok = keys <= pos
    if window is not None:
        ok = ok & (keys > pos - window)
    return torch.zeros(ok.shape, dtype=dtype, device=keys.device).masked_fill_(
        ~ok, torch.finfo(dtype).min
    )


_active = threading.local()


class activated:
    """`with activated(batch):` the forwards on this thread attend through `batch`."""

    def __init__(self, batch: StepBatch):
        self.batch = batch

    def __enter__(self) -> StepBatch:
        _active.batch = self.batch
        return self.batch

    def __exit__(self, *exc) -> None:
        _active.batch = None


def current() -> StepBatch:
    batch = getattr(_active, "batch", None)
    if batch is None:
        raise RuntimeError("paged attention called outside a runner's forward")
    return batch


def _attend(q, k, v, mask, scale, softcap):
    """softmax(q k^T * scale [softcapped] + mask) v, with grouped KV heads. q [b, H, t, d],
    k/v [b, Hkv, s, d], mask [b, 1, t, s] additive."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    return torch.matmul(torch.softmax((scores + mask).float(), dim=-1).to(v.dtype), v)


def _gather(pool: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[..., nb] block tables -> [..., heads, nb * block, dim] keys (or values)."""
    x = pool.index_select(0, tables.flatten())  # (index_select: 2.5x faster than pool[tables])
    x = x.view(*tables.shape[:-1], -1, *pool.shape[2:])  # [..., nb * block, heads, dim]
    return x.transpose(-3, -2)


def _decode_keys(batch: StepBatch, layer: int, k_new, v_new) -> tuple[torch.Tensor, torch.Tensor]:
    """The single-token rows' keys and values [Bd, Hkv, S, d]: from the runner's `DecodeKV`
    where the step uses it (its rows' new tokens written there), else gathered from the pool."""
    k_pool, v_pool = batch.pools[layer]
    kv = batch.decode_kv
    if kv is None:
        return _gather(k_pool, batch.decode_tables), _gather(v_pool, batch.decode_tables)
    if not batch.all_decode:  # a step where prompts join: only its decode rows' tokens
        k_new = k_new.index_select(0, batch.decode_index)
        v_new = v_new.index_select(0, batch.decode_index)
    return kv.read(layer, k_pool, v_pool, k_new, v_new, batch.decode_tables,
                   batch.decode_kv_index)  # fmt: skip


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, H, T, d], key/value [1, Hkv, T, d] (the
    step's new tokens); returns [1, T, H, d]."""
    batch = current()
    layer = module.layer_idx
    k_pool, v_pool = batch.pools[layer]
    window = batch.windows[layer]
    # 1. The new tokens' KV into their blocks.
    k_new = key[0].transpose(0, 1)  # [T, Hkv, d]
    v_new = value[0].transpose(0, 1)
    if k_new.dtype != k_pool.dtype:
        k_new, v_new = k_new.to(k_pool.dtype), v_new.to(v_pool.dtype)
    k_slots, v_slots = batch.slots[layer]
    k_slots.index_copy_(0, batch.slot_mapping, k_new)
    v_slots.index_copy_(0, batch.slot_mapping, v_new)
    q = query[0].transpose(0, 1)  # [T, H, d]
    if batch.cu_q is not None and softcap is None:
        out = _varlen(q, k_pool, v_pool, batch, window, scaling)
        return out.unsqueeze(0), None
    # 2. The exact path.
    if batch.all_decode:
        k, v = _decode_keys(batch, layer, k_new, v_new)
        out = _attend(q.unsqueeze(2), k, v, batch.decode_mask(window, q.dtype), scaling, softcap)
        return out.squeeze(2).unsqueeze(0), None
    out = q.new_empty(q.shape)
    if batch.decode_index.numel():
        k, v = _decode_keys(batch, layer, k_new, v_new)
        qd = q.index_select(0, batch.decode_index).unsqueeze(2)
        od = _attend(qd, k, v, batch.decode_mask(window, q.dtype), scaling, softcap)
        out.index_copy_(0, batch.decode_index, od.squeeze(2))
    if batch.group is not None:
        g = batch.group
        s, tmax = g.positions.shape
        qg = q.index_select(0, g.q_index).view(s, tmax, *q.shape[1:]).transpose(1, 2)
        k = _gather(k_pool, g.tables)
        v = _gather(v_pool, g.tables)
        og = _attend(qg, k, v, batch.group_mask(window, q.dtype), scaling, softcap)
        og = og.transpose(1, 2).reshape(s * tmax, *q.shape[1:])
        out.index_copy_(0, g.out_index, og.index_select(0, g.real))
    for i, c in enumerate(batch.chunks):
        k = _gather(k_pool, c.table).unsqueeze(0)
        v = _gather(v_pool, c.table).unsqueeze(0)
        qc = q[c.start : c.start + c.length].transpose(0, 1).unsqueeze(0)  # [1, H, t, d]
        oc = _attend(qc, k, v, batch.chunk_mask(i, window, q.dtype), scaling, softcap)
        out[c.start : c.start + c.length] = oc[0].transpose(0, 1)
    return out.unsqueeze(0), None


def _varlen(q, k_pool, v_pool, batch: StepBatch, window, scaling):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        q, k_pool, v_pool, batch.cu_q, None, batch.max_q, batch.max_k,
        scale=scaling, window_size=(-1, 0) if window is None else (window - 1, 0),
        enable_gqa=q.shape[1] != k_pool.shape[2], seqused_k=batch.seq_lens,
        block_table=batch.tables,
    )  # fmt: skip


def varlen_kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has a paged varlen kernel for `device`/`dtype` (CUDA, half types)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "block_table" in inspect.signature(varlen_attn).parameters


class Uploader:
    """Host int lists -> device tensors in one copy per forward.

    On CUDA the lists go through one of two persistent pinned staging buffers into a
    persistent device buffer, asynchronously: the forward is queued behind the copy and the
    host never waits for it. A staging buffer is refilled only once the copy that last read it
    has finished (its event; two forwards back, so in practice never a wait). Elsewhere the
    host tensor is used as it is.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host: list[torch.Tensor | None] = [None, None]
        self.dev: list[torch.Tensor | None] = [None, None]
        self.done: list = [None, None]
        self.turn = 0

    def __call__(self, arrays: list[list[int]]) -> list[torch.Tensor]:
        sizes = [len(a) for a in arrays]
        flat = torch.tensor([x for a in arrays for x in a], dtype=torch.long)
        if not self.cuda:
            return list(flat.to(self.device).split(sizes))
        i, n = self.turn, flat.numel()
        self.turn ^= 1
        if self.host[i] is None or self.host[i].numel() < n:
            size = max(n, 4096, 2 * (0 if self.host[i] is None else self.host[i].numel()))
            self.host[i] = torch.empty(size, dtype=torch.long, pin_memory=True)
            self.dev[i] = torch.empty(size, dtype=torch.long, device=self.device)
        elif self.done[i] is not None:
            self.done[i].synchronize()
        self.host[i][:n].copy_(flat)
        self.dev[i][:n].copy_(self.host[i][:n], non_blocking=True)
        self.done[i] = torch.cuda.Event()
        self.done[i].record()
        return list(self.dev[i][:n].split(sizes))


class AttentionSwitch:
    """Runs a module with another attention implementation inside `with` (transformers reads
    `config._attn_implementation` at every call), restoring its own afterwards. The value is
    written straight into each config (the module's and its sub-configs'), once per forward:
    the property setter walks the sub-configs every time, which cost 40 us per forward."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.configs = _configs(module.config)
        self.name = name

    def __enter__(self):
        self.saved = [c.__dict__.get("_attn_implementation_internal") for c in self.configs]
        for c in self.configs:
            c.__dict__["_attn_implementation_internal"] = self.name

    def __exit__(self, *exc):
        for c, saved in zip(self.configs, self.saved):
            c.__dict__["_attn_implementation_internal"] = saved


def _configs(config) -> list:
    """A config and its sub-configs, recursively (where transformers keeps the attention
    implementation of each part of a model)."""
    out = [config]
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "__dict__"):
            out += _configs(sub)
    return out
