"""One model's batched KV cache over plain Hugging Face caches: rows join and leave between steps.

The design is TGI's `CausalLMBatch`: a left-padded `DynamicCache` plus a 2-D attention mask;
`select` keeps (or repeats) rows, `concat` left-pads the shorter batch and stacks. Each model of
a family has its own `ModelBatch` over just the rows whose composition uses that model, and
its own prompt per row (per-model chat templates), so lengths and positions differ per model.

Invariant: every row's real tokens are contiguous at the right end of the time axis, so the
host-side `lengths` list fully describes the padding, and trimming needs no device sync.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .family import LoadedModel


class GrowableLayer(DynamicLayer):
    """A `DynamicLayer` that appends into spare capacity instead of re-concatenating.

    HF's `DynamicLayer.update` runs `torch.cat` on every step, copying the whole cache of the
    batch each token. Here `keys`/`values` are views of the first T columns of a larger buffer;
    a step writes one column in place, and the buffer grows by half when full (amortised O(1)).
    Whenever `keys` was replaced from outside (rows selected, batches concatenated) the next
    update adopts the new tensor as a fresh buffer, so `ModelBatch` can stay a plain tensor edit.
    """

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        used = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        buf = self._kbuf
        if (
            buf is None
            or self.keys.dim() != 4
            or self.keys.data_ptr() != buf.data_ptr()
            or self.keys.shape[:2] != buf.shape[:2]
            or used + t > buf.shape[-2]
        ):
            self._grow(key_states, value_states, used, t)
        self._kbuf[:, :, used : used + t] = key_states
        self._vbuf[:, :, used : used + t] = value_states
        self.keys = self._kbuf[:, :, : used + t]
        self.values = self._vbuf[:, :, : used + t]
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, used: int, t: int) -> None:
        capacity = used + t + max(16, (used + t) // 2)
        shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
        kbuf, vbuf = k.new_empty(shape), v.new_empty((*shape[:3], v.shape[3]))
        if used:
            kbuf[:, :, :used] = self.keys
            vbuf[:, :, :used] = self.values
        self._kbuf, self._vbuf = kbuf, vbuf


def new_cache(config) -> DynamicCache:
    """A DynamicCache whose full-attention layers are `GrowableLayer`s."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowableLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


class ModelBatch:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.cache = new_cache(model.module.config)
        self.device = model.input_device
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [b, T]
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [b]
        self.lengths: list[int] = []  # real tokens per row (host copy of mask.sum(-1))

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @torch.inference_mode()
    def forward(self, ids: list[list[int]] | torch.Tensor, logits_to_keep: int = 1) -> torch.Tensor:
        """Append tokens to every row and return the logits of the last `logits_to_keep`.

        `ids` is either a [b, 1] device tensor (a decode step) or ragged host lists (a prefill
        or prefill chunk), which are left-padded here. Returns [b, logits_to_keep, V] logits on
        the model's output device (all positions if `logits_to_keep` is 0).
        """
        if isinstance(ids, torch.Tensor):
            new = ids.to(self.device)
            new_mask = torch.ones_like(new)
            added = [new.shape[1]] * new.shape[0]
        else:
            width = max(len(r) for r in ids)
            pad = self.model.tokenizer.pad_token_id or 0
            new = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=self.device)
            new_mask = torch.tensor(
                [[0] * (width - len(r)) + [1] * len(r) for r in ids], device=self.device
            )
            added = [len(r) for r in ids]
        if self.size == 0:
            self.next_pos = torch.zeros(new.shape[0], dtype=torch.long, device=self.device)
            self.mask = torch.zeros(new.shape[0], 0, dtype=torch.long, device=self.device)
            self.lengths = [0] * new.shape[0]
        positions = self.next_pos.unsqueeze(-1) + (new_mask.cumsum(-1) - 1).clamp_min(0)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.model.module(
            input_ids=new,
            attention_mask=self.mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        self.next_pos = self.next_pos + new_mask.sum(-1)
        self.lengths = [n + a for n, a in zip(self.lengths, added)]
        return out.logits

    def select(self, rows: list[int]) -> None:
        """Keep `rows` in that order (a row may repeat: n sibling sequences share a prefill)."""
        if not rows:
            self.__init__(self.model)
            return
        index = torch.tensor(rows, device=self.device)
        self.lengths = [self.lengths[r] for r in rows]
        # Columns that are padding in every remaining row can go: trimming keeps the cache from
        # growing with churn when a long sequence leaves.
        trim = self.width - max(self.lengths)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))[:, :, trim:]
            layer.values = layer.values.index_select(0, index.to(layer.values.device))[:, :, trim:]
        self.mask = self.mask.index_select(0, index)[:, trim:]
        self.next_pos = self.next_pos.index_select(0, index)

    def extend(self, other: ModelBatch) -> None:
        """Append `other`'s rows after this batch's rows (left-padding the shorter one)."""
        if other.size == 0:
            return
        if self.size == 0:
            self.cache, self.mask, self.next_pos = other.cache, other.mask, other.next_pos
            self.lengths = list(other.lengths)
            return
        width = max(self.width, other.width)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat(
                [_left_pad(mine.values, width), _left_pad(theirs.values, width)]
            )
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.lengths = self.lengths + other.lengths

    def num_tokens(self) -> int:
        return sum(self.lengths)

    def nbytes(self) -> int:
        return sum(
            layer.keys.nbytes + layer.values.nbytes
            for layer in self.cache.layers
            if getattr(layer, "keys", None) is not None
        )


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the time axis (dim 2 of a KV tensor, dim 1 of a mask) to `width`."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
