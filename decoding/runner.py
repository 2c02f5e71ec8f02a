"""One runner per set of weights: its paged KV pool and one flattened forward per call.

Every sequence that uses a model holds a **handle** (an int) in that model's runner: a
`blocks.KVSeq`, i.e. a block table into the runner's pool. The pool is allocated once, at
start, from the engine's memory budget: per layer, keys and values `[blocks, block_size,
kv_heads, head_dim]`. Memory in use is blocks held x block bytes, whatever the lengths of the
other sequences (the slot cache before it grew every row to the longest one).

A forward takes any mix of rows: single decode tokens (their ids already on the device, from
the last sampling) and prompt chunks or verify blocks (ids from the host), and runs them as
one row `[1, T]` with no padding; `decoding/attention.py` writes and reads the pool through
the step's `StepBatch` (slot mapping, block tables), built on the host and copied to the device
in one transfer. The members of a runner (a model and the LoRA adapters over it, or one
checkpoint listed twice) share the pool and the forward, each token through its own adapter.

Plain decode steps can replay CUDA graphs instead (`enable_graphs`, `decoding/graphs.py`): one
per batch-size bucket over persistent buffers, used only once a replay has matched the eager
forward.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import get_layer_types_and_kwargs

from . import attention
from .attention import ATTENTION, AttentionSwitch, Chunk, Group, StepBatch, Uploader
from .blocks import NULL_BLOCK, BlockPool, KVSeq
from .decode_kv import DecodeKV
from .graphs import DecodeGraphs
from .loading import AdapterSwitch, LoadedModel

if TYPE_CHECKING:
    from .family import Family

KINDS = ("full_attention", "sliding_attention")
# Prompt chunks up to this long attend together in one padded call (prompts arriving together
# are alike); longer ones alone, so one long chunk never pads many short ones to its length.
SHORT_CHUNK = 64


class UnsupportedModelError(ValueError):
    """The model cannot be run over the paged KV pool (recurrent state, ALiBi, ...)."""


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
            f"{name} has layers of kind {other}, which keep no KV cache (a recurrent or "
            f"linear-attention state); eft-serve supports {list(KINDS)}"
        )
    return [kw.get("sliding_window") if t == "sliding_attention" else None
            for t, kw in zip(types, kwargs)]  # fmt: skip


@dataclass
class LayerShape:
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def token_bytes(self) -> int:
        """Bytes of keys and values one token takes in this layer."""
        return 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


class _Probe:
    """Stands in for a `StepBatch` during the shape probe: records each layer's KV shape."""

    def __init__(self) -> None:
        self.shapes: dict[int, LayerShape] = {}


def _probe_attention(module, query, key, value, *args, **kwargs):
    batch = attention.current()
    if isinstance(batch, _Probe):
        batch.shapes[module.layer_idx] = LayerShape(
            key.shape[1], key.shape[3], key.dtype, key.device
        )
        return query.transpose(1, 2), None
    return attention.paged_attention(module, query, key, value, *args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _probe_attention)


_register()


class ModelRunner:
    """One set of weights: its KV pool, the handles of the sequences held there, and its
    forwards.

    Handles are ints (`allocate`); each is the KV of one member (a model or an adapter) for
    one sequence. `prefill`/`decode`/`prefill_many`/`decode_many` are views of `forward`,
    which runs any mix of rows in one flattened call.
    """

    def __init__(self, models: LoadedModel | list[LoadedModel]):
        members = [models] if isinstance(models, LoadedModel) else list(models)
        self.model = members[0]
        self.name = self.model.name  # the member that timings and KV bytes are reported under
        self.members = [m.name for m in members]
        tuned = [m for m in members if m.adapter is not None]
        self.module = tuned[0].module if tuned else self.model.module
        self.switch = AdapterSwitch(self.module) if tuned else None
        self.adapter_of = {m.name: m.adapter or AdapterSwitch.BASE for m in members}
        self.device = self.model.input_device
        self.windows = attention_windows(self.module)
        self.dtype = self.module.dtype
        self._implementation: AttentionSwitch | None = None
        self.layers = self._probe()
        self.pool: BlockPool | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv_slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.seqs: dict[int, KVSeq] = {}
        self._next = 0
        # A model whose every layer slides can let go of the blocks behind its window.
        self.slide = min(self.windows) if self.windows and None not in self.windows else None  # type: ignore[type-var]
        self.use_varlen = False
        self.uploader = Uploader(self.device)
        self.graphs: DecodeGraphs | None = None  # see `enable_graphs`
        self.decode_kv: DecodeKV | None = None  # CPU: see `decoding/decode_kv.py`

    # ------------------------------------------------------------------ the pool

    @torch.inference_mode()
    def _probe(self) -> list[LayerShape]:
        probe = _Probe()
        with self._paged(), attention.activated(probe):  # type: ignore[arg-type]
            zero = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self._call([None], input_ids=zero, position_ids=zero)
        if sorted(probe.shapes) != list(range(len(self.windows))):
            raise UnsupportedModelError(
                f"{getattr(self.module.config, 'model_type', '?')}: its attention layers do not "
                "all go through transformers' attention interface"
            )
        return [probe.shapes[i] for i in range(len(self.windows))]

    @functools.cached_property
    def block_bytes_per_token(self) -> int:
        """KV bytes one token of one member takes over all layers."""
        return sum(s.token_bytes for s in self.layers)

    def allocate_pool(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)
        # Uninitialised memory (a CPU pool is only paged in as it is used); each block is
        # zeroed the first time it is handed out, so a masked key never reads a NaN.
        self.kv = [
            tuple(
                torch.empty(num_blocks, block_size, s.kv_heads, s.head_dim, dtype=s.dtype,
                            device=s.device)
                for _ in range(2)
            )
            for s in self.layers
        ]  # fmt: skip
        # Each pool seen per token too, where `slot_mapping` writes (one view, made once).
        self.kv_slots = [(k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])) for k, v in self.kv]
        for k, v in self.kv:
            k[NULL_BLOCK].zero_()
            v[NULL_BLOCK].zero_()
        self.use_varlen = attention.varlen_kernel_available(self.device, self.dtype)
        if self.device.type == "cpu":
            shapes = [(s.kv_heads, s.head_dim, s.dtype) for s in self.layers]
            self.decode_kv = DecodeKV(shapes, block_size, self.capacity_bytes() // 4)

    def capacity_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)

    def nbytes(self) -> int:
        """KV bytes in use: blocks held x bytes per block."""
        if self.pool is None:
            return 0
        return self.pool.num_used * self.pool.block_size * self.block_bytes_per_token

    # ------------------------------------------------------------------ handles

    def allocate(self, owner: str | None = None) -> int:
        handle = self._next
        self._next += 1
        owner = owner or self.name
        self.seqs[handle] = KVSeq(self.adapter_of.get(owner, owner), owner=owner)
        return handle

    @property
    def active(self) -> set[int]:
        return set(self.seqs)

    def length(self, handle: int) -> int:
        return self.seqs[handle].length

    def free(self, handle: int, scrub: bool = False) -> None:
        seq = self.seqs.pop(handle, None)
        if seq is None:
            return
        if scrub:  # a failed forward may have left NaNs in these blocks
            self._zero([b for b in seq.blocks if b != NULL_BLOCK and self.pool.refs[b] == 1])
        self.pool.free(seq)

    def reset(self) -> None:
        """Free every handle (after a failed step: the pool's contents are suspect)."""
        self._changed()
        for handle in list(self.seqs):
            self.free(handle)
        if self.pool is not None:
            for k, v in self.kv:
                k.zero_()
                v.zero_()

    def fork(self, src: int, count: int) -> list[int]:
        """`count` new handles holding `src`'s tokens, sharing its blocks (the siblings of an
        n > 1 request; the partial last block is copied on first write)."""
        out = []
        for _ in range(count):
            handle = self._next
            self._next += 1
            self.seqs[handle] = self.pool.fork(self.seqs[src])
            out.append(handle)
        return out

    def has_room(self, handle: int) -> bool:
        """Whether `handle`'s blocks hold one more token (most decode steps: no new block)."""
        seq = self.seqs[handle]
        return self.pool.writable(seq, len(seq.tokens) + 1)

    def needed(self, handle: int, upto: int) -> int:
        """New blocks `handle` needs to hold `upto` tokens."""
        return self.pool.needed(self.seqs[handle], upto)

    def reserve(self, handle: int, upto: int) -> None:
        """Blocks for `upto` tokens (raises `blocks.OutOfBlocks`, taking none). Bookkeeping
        only: new blocks are zeroed by the next forward."""
        self.pool.reserve(self.seqs[handle], upto)

    def match_prefix(self, handle: int, tokens: list[int]) -> int:
        """Take the cached blocks of `tokens`' longest cached prefix; returns their tokens."""
        return self.pool.match(self.seqs[handle], tokens)

    def truncate(self, handle: int, length: int) -> None:
        self._changed()
        self.pool.truncate(self.seqs[handle], length)

    def rewrite(self, handle: int, start: int, tokens: list[int]) -> None:
        """Record the ids of tokens written from device inputs (speculative drafts), so their
        blocks can be keyed for the prefix cache."""
        seq = self.seqs[handle]
        seq.tokens[start : start + len(tokens)] = tokens
        self.pool.commit(seq)

    def num_tokens(self, owner: str | None = None) -> int:
        """Tokens held by the handles of `owner` (a member), or of every member."""
        if owner is None:
            return sum(self.tokens_by_owner().values())
        return self.tokens_by_owner().get(owner, 0)

    def tokens_by_owner(self) -> dict[str, int]:
        """Tokens held per member (a window's released blocks no longer count)."""
        out: dict[str, int] = {}
        bs = self.pool.block_size
        for s in self.seqs.values():
            out[s.owner] = out.get(s.owner, 0) + len(s.tokens) - s.dropped * bs
        return out

    def _changed(self) -> None:
        """Held sequences changed other than by a decode token (a roll back, a failed step, a
        graph replay; `_carries` covers forwards of chunks): the decode keys kept since the
        last step are stale. New or freed handles need no call: handles are never reused, so
        other rows gather anew."""
        if self.decode_kv is not None:
            self.decode_kv.drop()

    def _zero(self, blocks: list[int] | torch.Tensor) -> None:
        if len(blocks):
            index = torch.as_tensor(blocks, device=self.device)
            for k, v in self.kv:
                k.index_fill_(0, index.to(k.device), 0)
                v.index_fill_(0, index.to(v.device), 0)

    # ------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def forward(
        self,
        handles: list[int],
        chunks: list[list[int] | None],
        decode_ids: torch.Tensor | None = None,
        keep_all: list[bool] | bool = False,
        decode_tokens: list[int] | None = None,
    ) -> torch.Tensor:
        """One flattened forward of every row: row i appends `chunks[i]` (host ids) or, where
        that is None, its next token of `decode_ids` (device, one per such row, in order) to
        `handles[i]`; `decode_tokens`, when given, are the same ids on the host (for the prefix
        cache's keys). Blocks must be reserved; any still missing are taken here. Returns the
        logits [K, V] of each row's last token, or of every token of the rows in `keep_all`,
        in row order."""
        keeps = keep_all if isinstance(keep_all, list) else [keep_all]
        if decode_ids is not None and not any(keeps) and not any(chunks):
            return self._decode(handles, decode_ids, decode_tokens)
        pool, bs = self.pool, self.pool.block_size
        keep = [keep_all] * len(handles) if isinstance(keep_all, bool) else keep_all
        seqs = [self.seqs[h] for h in handles]
        lens = [1 if c is None else len(c) for c in chunks]
        host_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        dec_index: list[int] = []
        dec_pos: list[int] = []
        dec_tables: list[list[int]] = []
        chunk_meta: list[tuple[int, int, int, list[int]]] = []
        keep_index: list[int] = []
        dec_rows: list[int] = []
        dec_pos_rows: list[bool] = []  # per decode-group entry: its id comes from the device
        t = 0
        for i, (seq, chunk, n) in enumerate(zip(seqs, chunks, lens)):
            start = len(seq.tokens)
            if not pool.writable(seq, start + n):
                pool.reserve(seq, start + n)
            blocks = seq.blocks
            if n == 1:  # a decode token (or a one-token chunk): the common case, kept short
                positions.append(start)
                slot_mapping.append(blocks[start // bs] * bs + start % bs)
                dec_index.append(t)
                dec_pos.append(start)
                dec_tables.append(blocks)
                if chunk is None:
                    host_ids.append(0)
                    dec_rows.append(i)
                    dec_pos_rows.append(True)
                    # Its id arrives on the device; -1 until `rewrite` tells it (drafts).
                    seq.tokens.append(decode_tokens[len(dec_rows) - 1] if decode_tokens else -1)
                else:
                    host_ids.extend(chunk)
                    seq.tokens.extend(chunk)
                    dec_pos_rows.append(False)
            else:
                positions.extend(range(start, start + n))
                slot_mapping.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
                host_ids.extend(chunk)
                seq.tokens.extend(chunk)
                chunk_meta.append((t, n, start, blocks))
            if keep[i]:
                keep_index.extend(range(t, t + n))
            else:
                keep_index.append(t + n - 1)
            t += n
        width = max((len(b) for b in dec_tables), default=0)
        carried = self._carries(handles, lens, dec_pos)
        named = {
            "ids": host_ids, "pos": positions, "smap": slot_mapping, "d_index": dec_index,
            "d_pos": dec_pos, "keep": keep_index,
            "d_tables": [] if carried else _padded(dec_tables, width),
            "kv_index": self.decode_kv.write_index(dec_pos) if carried else [],
            "from_device": [dec_index[j] for j, r in enumerate(dec_pos_rows) if r],
            **self._pool_changes(), **self._varlen_arrays(seqs, lens),
        }  # fmt: skip
        short = [m for m in chunk_meta if m[1] <= SHORT_CHUNK] if len(chunk_meta) > 1 else []
        chunk_meta = [m for m in chunk_meta if not (short and m[1] <= SHORT_CHUNK)]
        if short:
            tmax = max(m[1] for m in short)
            nb = max(len(m[3]) for m in short)
            clamp = [(m, [min(j, m[1] - 1) for j in range(tmax)]) for m in short]
            named["g_q"] = [m[0] + j for m, js in clamp for j in js]
            named["g_pos"] = [m[2] + j for m, js in clamp for j in js]
            named["g_tables"] = [x for m in short for x in m[3] + [NULL_BLOCK] * (nb - len(m[3]))]
            named["g_real"] = [i * tmax + j for i, m in enumerate(short) for j in range(m[1])]
            named["g_out"] = [m[0] + j for m in short for j in range(m[1])]
        names = list(named) + [f"chunk{i}" for i in range(len(chunk_meta))]
        dev = dict(zip(names, self._upload([*named.values(), *(m[3] for m in chunk_meta)])))
        self._apply_pool_changes(dev)
        ids = dev["ids"]
        if len(dec_rows) == t and decode_ids is not None:
            ids = decode_ids.to(ids.device)  # a plain decode step: the ids are all on the device
        elif dec_rows and decode_ids is not None:
            ids = ids.index_copy(0, dev["from_device"], decode_ids.to(ids.device))
        batch = StepBatch(
            block_size=bs,
            slot_mapping=dev["smap"],
            decode_index=dev["d_index"],
            decode_tables=None if carried else dev["d_tables"].view(len(dec_tables), max(width, 1)),
            decode_positions=dev["d_pos"],
            chunks=[Chunk(m[0], m[1], dev[f"chunk{i}"], m[2]) for i, m in enumerate(chunk_meta)],
            group=Group(
                dev["g_q"],
                dev["g_pos"].view(len(short), -1),
                dev["g_tables"].view(len(short), -1),
                dev["g_real"],
                dev["g_out"],
            )
            if short
            else None,  # fmt: skip
            all_decode=len(dec_index) == t,
            windows=self.windows,
            pools=self.kv,
            slots=self.kv_slots,
            decode_kv=self.decode_kv if carried else None,
            decode_kv_index=dev["kv_index"] if carried else None,
        )
        self._set_varlen(batch, dev, seqs, lens)
        owners = None
        if self.switch is not None:
            owners = [self.seqs[h].owner for h, n in zip(handles, lens) for _ in range(n)]
        # Every token's logits (0) without an index where every token is kept.
        keep_arg = 0 if len(keep_index) == t else dev["keep"]
        return self._run(batch, seqs, lens, owners, ids, dev["pos"], keep_arg)

    def _decode(
        self, handles: list[int], ids: torch.Tensor, tokens: list[int] | None
    ) -> torch.Tensor:
        """`forward` of a plain decode step (one token per row, ids on the device, the last
        logits of every row): the same computation with the least host work, since it is the
        step a server runs most."""
        pool, bs, refs = self.pool, self.pool.block_size, self.pool.refs
        seqs = [self.seqs[h] for h in handles]
        positions, slots = [], []
        for i, seq in enumerate(seqs):
            p = len(seq.tokens)
            blocks = seq.blocks
            if p >= len(blocks) * bs or refs[blocks[p // bs]] != 1:  # `pool.writable`, inlined
                pool.reserve(seq, p + 1)
            positions.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            seq.tokens.append(tokens[i] if tokens else -1)  # -1: see `rewrite`
        lens = [1] * len(seqs)
        graphs = self.graphs
        width = max(len(s.blocks) for s in seqs) if graphs is not None else 0
        if graphs is not None and (self.switch is None and graphs.bucket(len(seqs))
                                   and width <= graphs.width):  # fmt: skip
            self._changed()
            named = {
                "pos": positions,
                "smap": slots,
                "tables": _padded([s.blocks for s in seqs], width),
                **self._pool_changes(),
            }
            dev = dict(zip(named, self._upload(list(named.values()))))
            self._apply_pool_changes(dev)
            ids = ids.to(dev["pos"].device)
            return self._guarded(seqs, lens, lambda: graphs.run(ids, dev, len(seqs), width))
        # CPU: the rows' keys are kept contiguous from the last step (`carry` 0) or gathered
        # at `carry` blocks wide; None: gathered per layer.
        kv = self.decode_kv
        carry = kv.begin(tuple(handles), max(positions) + 1) if kv is not None else None
        named = {"pos": positions, "smap": slots}
        if carry == 0:
            named["kv_index"] = kv.write_index(positions)
        else:
            width = carry or max(len(s.blocks) for s in seqs)
            named["tables"] = _padded([s.blocks for s in seqs], width)
        named.update(**self._pool_changes(), **self._varlen_arrays(seqs, lens))
        dev = dict(zip(named, self._upload(list(named.values()))))
        self._apply_pool_changes(dev)
        pos = dev["pos"]
        batch = StepBatch(
            block_size=bs, slot_mapping=dev["smap"], decode_index=pos[:0],
            decode_tables=dev["tables"].view(len(seqs), width) if carry != 0 else None,
            decode_positions=pos, chunks=[], group=None, all_decode=True,
            windows=self.windows, pools=self.kv, slots=self.kv_slots,
            decode_kv=kv if carry is not None else None,
            decode_kv_index=dev.get("kv_index"),
        )  # fmt: skip
        self._set_varlen(batch, dev, seqs, lens)
        owners = [self.seqs[h].owner for h in handles] if self.switch is not None else None
        return self._run(batch, seqs, lens, owners, ids.to(pos.device), pos, 0)

    def _carries(self, handles: list[int], lens: list[int], dec_pos: list[int]) -> bool:
        """For a forward of chunks: whether its single-token rows are the rows `DecodeKV`
        holds (prompt chunks of other sequences join them), so their keys carry on. Otherwise
        they are gathered per layer, as without it (rows change every step while a burst of
        prompts joins: a copy made then would rarely be used twice), and it is dropped if it
        holds a row this forward writes into."""
        kv = self.decode_kv
        if kv is None:
            return False
        rows = tuple(h for h, n in zip(handles, lens) if n == 1)
        longest = max(dec_pos, default=-1) + 1
        if rows and rows == kv.rows and longest <= kv.capacity:
            return kv.begin(rows, longest) == 0
        if kv.rows is not None and any(h in kv.rows for h in handles):
            kv.drop()
        return False

    def _pool_changes(self) -> dict[str, list[int]]:
        """What the pool asked for since the last forward, as upload arrays: blocks new to it
        (zeroed before use) and shared blocks to copy before a sibling writes into them."""
        pool = self.pool
        fresh, pool.fresh = pool.fresh, []
        copies, pool.copies = pool.copies, []
        return {"fresh": fresh, "copy_from": [a for a, _ in copies],
                "copy_to": [b for _, b in copies]}  # fmt: skip

    def _apply_pool_changes(self, dev: dict[str, torch.Tensor]) -> None:
        if len(dev["fresh"]):
            self._zero(dev["fresh"])
        if len(dev["copy_to"]):
            for k, v in self.kv:
                k.index_copy_(0, dev["copy_to"], k.index_select(0, dev["copy_from"]))
                v.index_copy_(0, dev["copy_to"], v.index_select(0, dev["copy_from"]))

    def _varlen_arrays(self, seqs: list[KVSeq], lens: list[int]) -> dict[str, list[int]]:
        """A varlen kernel's inputs (cumulative query lengths, KV lengths, tables), if used."""
        if not self.use_varlen:
            return {}
        return {"cu_q": [0, *itertools.accumulate(lens)], "kv_lens": [len(s.tokens) for s in seqs],
                "tables_all": _padded([s.blocks for s in seqs])}  # fmt: skip

    def _set_varlen(self, batch: StepBatch, dev: dict, seqs: list[KVSeq], lens: list[int]) -> None:
        if self.use_varlen:
            batch.cu_q, batch.seq_lens = dev["cu_q"].int(), dev["kv_lens"].int()
            batch.tables = dev["tables_all"].view(len(seqs), -1).int()
            batch.max_q, batch.max_k = max(lens), max(len(s.tokens) for s in seqs)

    def _run(self, batch, seqs, lens, owners, ids, positions, keep) -> torch.Tensor:
        """The model over the step's one row, attending through `batch` (see `_guarded`)."""

        def call() -> torch.Tensor:
            with self._paged(), attention.activated(batch):
                return self._call(owners, input_ids=ids.unsqueeze(0),
                                  position_ids=positions.unsqueeze(0),
                                  logits_to_keep=keep).logits[0]  # fmt: skip

        return self._guarded(seqs, lens, call)

    def _guarded(self, seqs: list[KVSeq], lens: list[int], call) -> torch.Tensor:
        """`call()` (a forward that appended `lens` tokens to `seqs`), rolled back on failure;
        then full blocks keyed and blocks behind a sliding window let go."""
        pool = self.pool
        try:
            out = call()
        except BaseException:
            self._changed()
            for seq, n in zip(seqs, lens):
                pool.truncate(seq, len(seq.tokens) - n)
            raise
        bs = pool.block_size
        for seq in seqs:
            if len(seq.keys) < len(seq.tokens) // bs:  # a block filled up
                pool.commit(seq)
        if self.slide is not None:
            for seq in seqs:
                pool.drop_before(seq, len(seq.tokens) - self.slide)
        return out

    def _upload(self, arrays: list[list[int]]) -> list[torch.Tensor]:
        return self.uploader(arrays)

    def prefill(
        self, slots: list[int], chunks: list[list[int]], keep_all: bool = False
    ) -> torch.Tensor:
        """Append each chunk to its handle; logits [b, V] at each chunk's last token, or
        [b, t, V] at every position (right-padded with zeros) when `keep_all`."""
        out = self.forward(slots, chunks, keep_all=keep_all)
        if not keep_all:
            return out
        return _pad_rows(out, [len(c) for c in chunks])

    def decode(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One token for each handle in `slots` (`tokens` [b] on any device); logits [b, V]."""
        return self.forward(slots, [None] * len(slots), tokens)

    def prefill_many(
        self, calls: dict[str, tuple[list[int], list[list[int]]]], keep_all: bool = False
    ) -> dict[str, torch.Tensor]:
        """`prefill` of several members' rows ({member: (slots, chunks)}) in one forward;
        each member's logits (with `keep_all`, padded to the longest chunk of any member)."""
        slots = [s for sl, _ in calls.values() for s in sl]
        out = self.prefill(slots, [c for _, ch in calls.values() for c in ch], keep_all)
        return _split(out, {m: len(sl) for m, (sl, _) in calls.items()})

    def decode_many(
        self, calls: dict[str, tuple[list[int], torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """`decode` of several members' rows ({member: (slots, tokens)}) in one forward."""
        slots = [s for sl, _ in calls.values() for s in sl]
        tokens = torch.cat([t.to(self.device) for _, t in calls.values()])
        return _split(self.decode(slots, tokens), {m: len(sl) for m, (sl, _) in calls.items()})

    def _paged(self):
        if self._implementation is None:
            self._implementation = AttentionSwitch(self.module, ATTENTION)
        return self._implementation

    def _call(self, owners: list[str | None] | None, **inputs):
        if self.switch is None or owners is None:
            return self.module(**inputs, use_cache=False)
        with self.switch.rows([self.adapter_of[o or self.name] for o in owners]):
            return self.module(**inputs, use_cache=False)

    @torch.inference_mode()
    def last_logits(self, member: str, ids: list[int]) -> torch.Tensor:
        """`member`'s logits after `ids`, from its own full forward (no KV): startup probes."""
        out = self._call([member] * len(ids), input_ids=torch.tensor([ids], device=self.device))
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def self_check(self) -> None:
        """Refuse a model whose forward over the paged pool differs from its own full
        forward: two prompts of different lengths, each prefilled in two chunks (the second
        chunks in one forward), then decode steps."""
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
                    full = self._call(
                        [None] * len(ids), input_ids=torch.tensor([ids], device=self.device)
                    )
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
            if self.use_varlen:  # the kernel disagrees with the model: use the exact path
                self.use_varlen = False
                return self.self_check()
            name = getattr(self.module.config, "model_type", type(self.module).__name__)
            raise UnsupportedModelError(
                f"{name}: its forward over eft-serve's paged KV differs from its own full "
                f"forward (log-prob difference {worst:.3g}); this architecture is not supported"
            )

    @torch.inference_mode()
    def enable_graphs(self, max_batch: int, max_len: int, capture: bool) -> str | None:
        """Replay plain decode steps of up to `max_batch` rows from `DecodeGraphs` (captured
        when `capture`, else the same buffers run eagerly), once they match the eager decode
        on a check; returns why not, or None when enabled. Runners with adapters keep eager
        decode (their per-token adapter switch is not part of a graph)."""
        if self.switch is not None:
            return "adapters switch per token"
        if capture and not self.use_varlen:
            # The exact path would gather every row's blocks up to the context's width.
            return "needs the varlen paged kernel (the exact path reads the whole width)"
        width = min(-(-max_len // self.pool.block_size), self.pool.num_blocks - 1)
        try:
            graphs = DecodeGraphs(self, max_batch, width, capture)
            worst = self._graphs_vs_eager(graphs)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the eager decode
            return f"capture failed: {exc}"
        tolerance = 1e-3 if self.dtype == torch.float32 else 0.25
        if not worst <= tolerance:
            return f"replay differs from the eager decode (log-prob difference {worst:.3g})"
        self.graphs = graphs
        return None

    def _graphs_vs_eager(self, graphs: DecodeGraphs) -> float:
        """The largest log-prob difference between eager and replayed decode steps of the
        same rows over the same KV: three sequences (one of them crossing a block boundary),
        decoded as batches of 3 (a padded bucket) and 1."""
        vocab = self.module.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(1)
        bs = self.pool.block_size
        lengths = [3, bs, bs + 5]
        slots = [self.allocate() for _ in lengths]
        worst = 0.0
        try:
            for s, k in zip(slots, lengths):
                self.prefill([s], [torch.randint(0, vocab, (k,), generator=gen).tolist()])
            for rows in (slots, slots[2:]):
                tokens = torch.randint(0, vocab, (len(rows),), generator=gen).to(self.device)
                self.graphs = None
                eager = torch.log_softmax(self.decode(rows, tokens).float(), -1)
                for s in rows:
                    self.truncate(s, len(self.seqs[s].tokens) - 1)
                self.graphs = graphs
                replay = torch.log_softmax(self.decode(rows, tokens).float(), -1)
                worst = max(worst, (replay - eager).abs().max().item())
        finally:
            self.graphs = None
            for s in slots:
                self.free(s)
        return worst


def _padded(tables: list[list[int]], width: int | None = None) -> list[int]:
    """Block tables flattened into one list, each padded with the null block to `width` (the
    longest by default)."""
    width = max((len(b) for b in tables), default=0) if width is None else width
    return [x for b in tables for x in b + [NULL_BLOCK] * (width - len(b))]


def _pad_rows(out: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """Flat per-token rows [sum(lens), V] -> [b, max(lens), V], zero padded."""
    t = max(lens)
    padded = out.new_zeros(len(lens), t, out.shape[-1])
    for i, piece in enumerate(out.split(lens)):
        padded[i, : len(piece)] = piece
    return padded


def _split(out: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    return dict(zip(sizes, out.split(list(sizes.values()))))


def reserve_all(runners: dict[str, ModelRunner], want: dict[str, tuple[int, int]]) -> bool:
    """Blocks for {model: (handle, tokens to hold)} in every pool, or none at all (members of
    one runner draw on the same pool, so their needs add up)."""
    need: dict[int, int] = {}
    for m, (handle, upto) in want.items():
        runner = runners[m]
        need[id(runner)] = need.get(id(runner), 0) + runner.needed(handle, upto)
    if any(need.get(id(runners[m]), 0) > runners[m].pool.num_free for m in want):
        return False
    for m, (handle, upto) in want.items():
        runners[m].reserve(handle, upto)
    return True


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
