"""One runner per model: its KV slots and the forward of the rows that use it.

Every sequence that uses a model holds one **slot** of that model's cache for its whole life.
A slot is a row of per-layer buffers `[slots, kv_heads, capacity, head_dim]`; its tokens sit at
positions `0..length-1`. Joining writes only the new sequence's prefill into its slot; leaving
frees the slot (and zeroes it) without touching any other row, so no step copies the cache of
rows that did not change (the first engine re-concatenated every model's whole cache on every
join and leave).

The model runs unmodified: `SlotCache` is a transformers `Cache` whose `update` writes the new
keys/values at each row's own positions and hands back the keys to attend over, and the runner
passes its own 4-D attention masks (transformers uses a 4-D mask as it is), one per attention
kind when a model mixes full and sliding-window layers (Gemma-2/3, Qwen2's
`max_window_layers`). Sliding-window layers keep every token and the mask restricts them to
the window, so one addressing scheme serves every layer.

Three ways to address the cache in a forward:
- `own`: a prefill of fresh slots attends only to the keys it has just computed (no read);
- `view`: a decode over slots `0..S-1` attends to a view of the buffers (no copy);
- `gather`: a prefill chunk that continues a prompt, or a decode whose rows are sparse among
  the slots, gathers its rows' keys (a copy of just those rows).
Buffers grow in the time dimension by half when full (amortised O(1)) and are released when
the runner has no sequence left. A paged cache would replace the slot row by a block table
(same `update` hook); CUDA graphs would capture `view` decodes per batch-size bucket over a
fixed capacity. `docs/architecture.md` says more.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from .family import Family, LoadedModel
from .loading import AdapterSwitch

KINDS = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """The model cannot be run with per-slot KV caches (recurrent state, ALiBi, ...)."""


def attention_windows(module: torch.nn.Module) -> list[int | None]:
    """Each layer's attention window (None = full attention), or UnsupportedModelError."""
    config = module.config
    name = getattr(config, "model_type", type(module).__name__)
    if getattr(module, "_is_stateful", False):
        raise UnsupportedModelError(
            f"{name} keeps a recurrent state instead of a KV cache (Mamba-style); eft-serve "
            "serves attention models only"
        )
    if getattr(config, "alibi", False) or name in ("bloom", "mpt"):
        raise UnsupportedModelError(f"{name} uses ALiBi position biases, which eft-serve lacks")
    text = config.get_text_config(decoder=True)
    try:
        types, kwargs = get_layer_types_and_kwargs(text)
    except Exception as exc:  # configs too old or too exotic to describe their layers
        raise UnsupportedModelError(f"{name}: cannot tell its attention layers ({exc})") from exc
    other = sorted({t for t in types if t not in KINDS})
    if other:
        raise UnsupportedModelError(
            f"{name} has layers of kind {other}; eft-serve supports {list(KINDS)}"
        )
    return [kw.get("sliding_window") if t == "sliding_attention" else None
            for t, kw in zip(types, kwargs)]  # fmt: skip


@dataclass
class _Addressing:
    """Where one forward writes and what it attends to (set by the runner before each call)."""

    slots: torch.Tensor  # [b] slot each row reads ("gather") and writes
    write: torch.Tensor  # [b, t] cache position of each new token
    mode: str  # "own" | "view" | "gather"
    width: int  # key positions to attend over ("view"/"gather")
    targets: torch.Tensor | None = None  # [b] slot each row writes, when not `slots`


class SlotCache(Cache):
    """A transformers `Cache` over stable slots. Only `update` carries data."""

    def __init__(self, num_layers: int, num_slots: int):
        # Cache.__init__ wants layer objects; none of its per-layer machinery is used here.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.scratch = num_slots  # one extra row where the padding rows of a decode write
        self.capacity = 0  # positions per slot in every allocated buffer
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.addr: _Addressing | None = None
        self._on: dict[torch.device, _Addressing] = {}

    def set_addressing(self, addr: _Addressing) -> None:
        self.addr = addr
        self._on = {addr.slots.device: addr}

    def _addressing(self, device: torch.device) -> _Addressing:
        # Layers spread over several devices (device_map="auto") each get their own copy.
        if device not in self._on:
            a = self.addr
            targets = None if a.targets is None else a.targets.to(device)
            self._on[device] = _Addressing(
                a.slots.to(device), a.write.to(device), a.mode, a.width, targets
            )
        return self._on[device]

    def reserve(self, positions: int) -> None:
        """Make room for `positions` tokens per slot (grows every allocated buffer by half)."""
        if positions <= self.capacity:
            return
        new = max(positions, self.capacity + self.capacity // 2, 64)
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    grown = buf.new_zeros(*buf.shape[:2], new, buf.shape[3])
                    grown[:, :, : self.capacity] = buf
                    store[i] = grown
        self.capacity = new

    def release(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.capacity = 0

    def clear_slot(self, slot: int) -> None:
        # Masks are additive; a NaN left by a failed row would survive `+ -inf`, so freed slots
        # go back to zero.
        for store in (self.keys, self.values):
            for buf in store:
                if buf is not None:
                    buf[slot].zero_()

    def copy_slot(self, src: int, dst: list[int], length: int) -> None:
        for store in (self.keys, self.values):
            for buf in store:
                if buf is not None:
                    # A copy first: when the slot is full, source and target overlap in memory.
                    buf[dst, :, :length] = buf[src, :, :length].clone()

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.keys + self.values if b is not None)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        a = self._addressing(key_states.device)
        if self.keys[layer_idx] is None:
            shape = (self.num_slots + 1, key_states.shape[1], self.capacity)
            self.keys[layer_idx] = key_states.new_zeros(*shape, key_states.shape[3])
            self.values[layer_idx] = value_states.new_zeros(*shape, value_states.shape[3])
        kbuf, vbuf = self.keys[layer_idx], self.values[layer_idx]
        rows = (a.slots if a.targets is None else a.targets).unsqueeze(-1)
        kbuf[rows, :, a.write] = key_states.transpose(1, 2)
        vbuf[rows, :, a.write] = value_states.transpose(1, 2)
        if a.mode == "own":
            return key_states, value_states
        if a.mode == "view":
            b = a.slots.shape[0]
            return kbuf[:b, :, : a.width], vbuf[:b, :, : a.width]
        return kbuf[a.slots, :, : a.width], vbuf[a.slots, :, : a.width]

    # What transformers may ask of a cache besides `update`.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    def __len__(self) -> int:
        return self.num_layers


class ModelRunner:
    """One set of weights: its slots, and its forwards (prefill chunks of joining rows, decode
    steps).

    The family entries that run these weights (the same checkpoint listed twice, a model and
    the LoRA adapters over it) are the runner's *members*: each keeps its own slots, and one
    forward serves the rows of every member, each row through its own adapter
    (`prefill_many`/`decode_many`): a reference and its k adapters cost one forward per step,
    not k + 1.
    """

    def __init__(self, models: LoadedModel | list[LoadedModel], num_slots: int):
        members = [models] if isinstance(models, LoadedModel) else list(models)
        self.model = members[0]
        self.name = self.model.name  # the member that timings and KV bytes are reported under
        tuned = [m for m in members if m.adapter is not None]
        self.module = tuned[0].module if tuned else self.model.module
        self.switch = AdapterSwitch(self.module) if tuned else None
        self.adapter_of = {m.name: m.adapter or AdapterSwitch.BASE for m in members}
        self.device = self.model.input_device
        self.windows = attention_windows(self.module)
        self.kinds = sorted({w for w in self.windows}, key=lambda w: (w is not None, w or 0))
        self.dtype = self.module.dtype
        self.pad_id = self.model.tokenizer.pad_token_id or 0
        self.cache = SlotCache(len(self.windows), num_slots)
        self.lengths = [0] * num_slots  # tokens held by each slot
        self.owner: list[str | None] = [None] * num_slots  # the member holding each slot
        self._free = list(range(num_slots))  # a heap: the lowest free slot is taken first
        self.active: set[int] = set()

    # ------------------------------------------------------------------ slots

    def reset(self) -> None:
        """Free every slot and the buffers."""
        self.cache.release()
        self.lengths = [0] * len(self.lengths)
        self._free = list(range(len(self.lengths)))
        self.active.clear()

    def allocate(self, owner: str | None = None) -> int:
        if not self._free:
            raise RuntimeError(f"model {owner or self.name!r}: no free KV slot")
        slot = heapq.heappop(self._free)
        self.active.add(slot)
        self.lengths[slot] = 0
        self.owner[slot] = owner or self.name
        return slot

    @torch.inference_mode()
    def free(self, slot: int) -> None:
        if slot not in self.active:
            return
        self.active.discard(slot)
        heapq.heappush(self._free, slot)
        self.lengths[slot] = 0
        if self.active:
            self.cache.clear_slot(slot)
        else:
            self.cache.release()

    @torch.inference_mode()
    def fork(self, src: int, count: int) -> list[int]:
        """`count` new slots holding a copy of `src`'s tokens (the siblings of an n > 1 request)."""
        dst = [self.allocate(self.owner[src]) for _ in range(count)]
        try:
            if dst:
                self.cache.copy_slot(src, dst, self.lengths[src])
        except BaseException:
            for d in dst:  # a failed copy must not leak its slots
                self.free(d)
            raise
        for d in dst:
            self.lengths[d] = self.lengths[src]
        return dst

    def num_tokens(self, owner: str | None = None) -> int:
        """Tokens held in the slots of `owner` (a member), or of every member."""
        return sum(self.lengths[s] for s in self.active if owner in (None, self.owner[s]))

    def nbytes(self) -> int:
        return self.cache.nbytes()

    @torch.inference_mode()
    def self_check(self) -> None:
        """Refuse a model whose forward over KV slots differs from its own full forward.

        Two prompts of different lengths, each prefilled in two chunks (the second chunks
        ragged, in one forward), then decode steps: an architecture that ignores our masks or
        keeps state outside the cache shows up here as a mismatch, not as wrong tokens later.
        """
        if len(self.lengths) < 2:
            return
        vocab = self.module.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in (4, 7)]
        slots = [self.allocate(), self.allocate()]
        try:
            self.prefill([slots[0]], [seqs[0][:2]])
            self.prefill([slots[1]], [seqs[1][:3]])
            logits = self.prefill(slots, [seqs[0][2:], seqs[1][3:]])  # ragged continuations
            worst = 0.0
            for step in range(3):
                for i, ids in enumerate(seqs):
                    full = self._forward([None], input_ids=torch.tensor([ids], device=self.device))
                    want = torch.log_softmax(full.logits[0, -1].float(), -1)
                    got = torch.log_softmax(logits[i].float().to(want.device), -1)
                    worst = max(worst, (got - want).abs().max().item())
                if step == 2:
                    break
                tokens = [int(x.argmax()) for x in logits]
                for ids, t in zip(seqs, tokens):
                    ids.append(t)
                logits = self.decode(slots, torch.tensor(tokens))
        finally:
            for s in slots:
                self.free(s)
        tolerance = 1e-3 if self.dtype == torch.float32 else 0.25
        if not worst <= tolerance:
            name = getattr(self.module.config, "model_type", type(self.module).__name__)
            raise UnsupportedModelError(
                f"{name}: its forward over eft-serve's KV slots differs from its own full "
                f"forward (log-prob difference {worst:.3g}); this architecture is not supported"
            )

    # ------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def prefill(
        self, slots: list[int], chunks: list[list[int]], keep_all: bool = False
    ) -> torch.Tensor:
        """Append each chunk to its slot; return logits [b, V] at each chunk's last token, or
        [b, t, V] at every position (right-padded) when `keep_all`. Each row runs as the member
        that owns its slot."""
        dev = self.device
        b, t = len(slots), max(len(c) for c in chunks)
        starts = [self.lengths[s] for s in slots]
        lens = torch.tensor([len(c) for c in chunks], device=dev)
        start = torch.tensor(starts, device=dev)
        ids = torch.tensor([c + [self.pad_id] * (t - len(c)) for c in chunks], device=dev)
        steps = torch.arange(t, device=dev)
        q_pos = start.unsqueeze(-1) + steps  # [b, t]
        fresh = not any(starts)
        width = t if fresh else max(starts) + t
        self.cache.reserve(max(starts) + t)
        self.cache.set_addressing(
            _Addressing(torch.tensor(slots, device=dev), q_pos, "own" if fresh else "gather", width)
        )
        # Padding repeats the last real position, so learned position tables are never overrun.
        positions = torch.minimum(q_pos, (start + lens - 1).unsqueeze(-1))
        last = [len(c) - 1 for c in chunks]
        if keep_all:
            keep: int | torch.Tensor = 0
        else:
            uniq = sorted(set(last))
            keep = torch.tensor(uniq, device=dev)
        out = self._forward(
            [self.owner[s] for s in slots],
            input_ids=ids,
            attention_mask=self._masks(q_pos, start + lens, width),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        for s, n in zip(slots, (len(c) for c in chunks)):
            self.lengths[s] += n
        if keep_all:
            return out
        col = {p: i for i, p in enumerate(uniq)}
        pick = torch.tensor([col[p] for p in last], device=out.device)
        return out[torch.arange(b, device=out.device), pick]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One token for each slot in `slots` (`tokens` [b] on any device); logits [b, V]."""
        dev = self.device
        span = max(slots) + 1
        width = max(self.lengths[s] for s in slots) + 1
        self.cache.reserve(width)
        index = torch.tensor(slots, device=dev)
        if 2 * len(slots) >= span:
            # Dense: rows are the slots 0..span-1 and attend to a view of the buffers (no copy).
            # The rows of slots not decoding now are padding: they write to the scratch row.
            decoding = set(slots)
            pos = [self.lengths[s] if s in decoding else 0 for s in range(span)]
            targets = [s if s in decoding else self.cache.scratch for s in range(span)]
            ids = torch.full((span,), self.pad_id, dtype=torch.long, device=dev)
            ids[index] = tokens.to(dev)
            q_pos = torch.tensor(pos, device=dev).unsqueeze(-1)
            addr = _Addressing(
                torch.arange(span, device=dev),
                q_pos,
                "view",
                width,
                torch.tensor(targets, device=dev),
            )
        else:
            # Sparse: computing the holes would cost more than gathering these rows' keys.
            ids = tokens.to(dev)
            q_pos = torch.tensor([self.lengths[s] for s in slots], device=dev).unsqueeze(-1)
            addr = _Addressing(index, q_pos, "gather", width)
        self.cache.set_addressing(addr)
        if addr.mode == "view":  # padding rows run as whichever member holds their slot
            owners = [self.owner[s] or self.name for s in range(span)]
        else:
            owners = [self.owner[s] for s in slots]
        out = self._forward(
            owners,
            input_ids=ids.unsqueeze(-1),
            attention_mask=self._masks(q_pos, q_pos.squeeze(-1) + 1, width),
            position_ids=q_pos,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        for s in slots:
            self.lengths[s] += 1
        return out.index_select(0, index.to(out.device)) if addr.mode == "view" else out

    def prefill_many(
        self, calls: dict[str, tuple[list[int], list[list[int]]]], keep_all: bool = False
    ) -> dict[str, torch.Tensor]:
        """`prefill` of several members' rows ({member: (slots, chunks)}) in one forward;
        each member's logits (with `keep_all`, padded to the longest chunk of any member)."""
        slots = [s for sl, _ in calls.values() for s in sl]
        out = self.prefill(slots, [c for _, ch in calls.values() for c in ch], keep_all)
        return self._split(out, {m: len(sl) for m, (sl, _) in calls.items()})

    def decode_many(
        self, calls: dict[str, tuple[list[int], torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """`decode` of several members' rows ({member: (slots, tokens)}) in one forward."""
        slots = [s for sl, _ in calls.values() for s in sl]
        tokens = torch.cat([t.to(self.device) for _, t in calls.values()])
        return self._split(self.decode(slots, tokens), {m: len(sl) for m, (sl, _) in calls.items()})

    @staticmethod
    def _split(out: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
        return dict(zip(sizes, out.split(list(sizes.values()))))

    def _forward(self, owners: list[str | None], **inputs):
        if self.switch is None:
            return self.module(**inputs)
        with self.switch.rows([self.adapter_of[o or self.name] for o in owners]):
            return self.module(**inputs)

    def _masks(self, q_pos: torch.Tensor, valid: torch.Tensor, width: int):
        """Additive [b, 1, t, width] masks: causal, within each row's own tokens, and within
        the window for sliding layers; a dict by layer kind when the model mixes kinds."""
        keys = torch.arange(width, device=q_pos.device)
        allowed = (keys <= q_pos.unsqueeze(-1)) & (keys < valid.view(-1, 1, 1))
        masks = {}
        for window in self.kinds:
            ok = allowed if window is None else allowed & (keys > q_pos.unsqueeze(-1) - window)
            mask = torch.zeros(ok.shape, dtype=self.dtype, device=q_pos.device)
            masks[window] = mask.masked_fill_(~ok, torch.finfo(self.dtype).min).unsqueeze(1)
        if len(masks) == 1:
            return next(iter(masks.values()))
        return {
            "full_attention": masks.get(None),
            "sliding_attention": next(m for w, m in masks.items() if w is not None),
        }


def weight_groups(family: Family) -> list[list[str]]:
    """The family's entries grouped by the weights they run (an adapter runs its model's), in
    family order: each group is one runner's members."""
    groups: dict[int, list[str]] = {}
    for name, m in family.models.items():
        owner = family.models[m.shares_weights_with or name]
        # An adapter outside the shared tree (DoRA, ...) runs its own module alone.
        runs_owner = m.adapter is not None or m.module is owner.module
        groups.setdefault(id(owner.module if runs_owner else m.module), []).append(name)
    return list(groups.values())


def unique_runners(runners: dict[str, ModelRunner]) -> list[tuple[ModelRunner, list[str]]]:
    """Each distinct runner of a {model: runner} map, with its members in the map's order."""
    out: dict[int, tuple[ModelRunner, list[str]]] = {}
    for name, runner in runners.items():
        out.setdefault(id(runner), (runner, []))[1].append(name)
    return list(out.values())
