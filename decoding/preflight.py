"""`eft-serve --check`: what a family would load, without loading a weight.

Every entry's config and tokenizer are read (a GGUF file's from its metadata) and its model is
built on the meta device, so a 70B family described by its config files answers in seconds.
The report gives each entry's parameters, dtype, weight bytes, KV bytes per token and device,
the family's shared vocabulary, stop ids and context, the answer-boundary verdict that can be
made from the renderings alone (the first token each model prefers needs the weights: the
server probes it at startup), and whether every device holds its weights plus the KV cache of
one full-context sequence in every entry it serves. Problems that `eft-serve --config` would
stop on (a bad config, a missing file, different vocabularies, a device that is not here, a
family that does not fit) make the check fail (exit status 2).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from . import boundary, loading
from .config import EngineConfig
from .errors import FamilyError
from .family import FamilyConfig, family_answer_whitespace, shared_vocab_size, stop_ids
from .loading import Checkpoint
from .memory import physical_memory
from .runner import UnsupportedModelError, attention_windows

log = logging.getLogger(__name__)

ACTIVATION_MARGIN = 512 << 20  # what the server keeps free for kernels' workspaces on a GPU


@dataclass
class EntryReport:
    name: str
    device: str  # cpu | cuda | cuda:N | auto
    dtype: torch.dtype
    params: int
    weight_bytes: int  # 0 when the entry shares another entry's weights
    kv_bytes_per_token: int
    max_positions: int
    source: str
    shares_weights_with: str | None = None
    tokenizer: Any = None
    template: str = "tokenizer"
    vocab_rows: int = 0  # rows of its output embedding (config.vocab_size)
    generation_config: Any = None

    def line(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        shared = f"  [shares the weights of {self.shares_weights_with}]" * bool(
            self.shares_weights_with
        )
        return (
            f"  {self.name:<16} {_params(self.params):>8} params  {dtype:<8} "
            f"weights {_bytes(self.weight_bytes):>10}  KV {_bytes(self.kv_bytes_per_token):>9}"
            f"/token  {self.device:<6}  context {self.max_positions}{shared}"
        )


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        verdict = "ok" if self.ok else "FAILED: " + "; ".join(self.problems)
        return "\n".join([*self.lines, f"check: {verdict}"]) + "\n"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _quiet():
    """transformers prints progress bars and notices while it reads GGUF metadata."""
    return contextlib.redirect_stderr(io.StringIO())


def _meta_sizes(config: Any, dtype: torch.dtype) -> tuple[int, int]:
    """(parameters, KV bytes per token) of `config`'s model, built on the meta device: every
    layer the runner finds, sliding ones included (the paged cache holds every token)."""
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in module.parameters())  # a tied parameter is listed once
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    layers = len(attention_windows(module))
    return params, layers * 2 * kv_heads * head_dim * dtype.itemsize


def _entry(
    name: str, spec: Any, device: str | None, dtype: str | None, configs: dict[tuple, Any]
) -> tuple[Checkpoint, Any]:
    path, gguf_file = loading.split_gguf_path(spec.path, spec.gguf_file)
    dev = loading.resolve_device(device or spec.device)
    kind = loading.resolve_dtype(dtype or spec.dtype, dev)
    ckpt = Checkpoint(path, gguf_file, spec.revision, kind, dev)
    loading.check_exists(name, ckpt)
    key = (path, gguf_file, spec.revision)
    if key in configs:
        return ckpt, configs[key]
    kwargs = {k: v for k, v in (("gguf_file", gguf_file), ("revision", spec.revision)) if v}
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - one line naming the entry, as a load would give
        raise loading.load_failure(name, f"the config of {ckpt.source!r}", exc) from exc
    configs[key] = config
    return ckpt, config


def _generation_config(ckpt: Checkpoint, config: Any) -> Any:
    try:
        kwargs = {"revision": ckpt.revision} if ckpt.revision else {}
        return GenerationConfig.from_pretrained(ckpt.path, **kwargs)
    except (OSError, ValueError):  # none shipped (a GGUF file): what the model config says
        return GenerationConfig.from_model_config(config)


def check(
    config: FamilyConfig | str | Path,
    device: str | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization,
) -> Report:
    """The pre-flight report of a family (`device`/`dtype` override every entry's, as the
    CLI's --device/--dtype do)."""
    report = Report()
    try:
        if not isinstance(config, FamilyConfig):
            config = FamilyConfig.from_yaml(config)
        entries = _entries(config, device, dtype)
    except FamilyError as exc:
        report.problems.append(str(exc))
        return report
    cfg = config
    report.lines.append(
        f"family {cfg.name}: base={cfg.base} reference={cfg.reference} "
        f"experts={','.join(cfg.experts) or '-'} defaults={cfg.defaults}"
    )
    report.lines += [e.line() for e in entries.values()]
    tokenizers = {n: e.tokenizer for n, e in entries.items()}
    try:
        vocab = shared_vocab_size(tokenizers, {n: e.vocab_rows for n, e in entries.items()})
    except FamilyError as exc:
        report.problems.append(str(exc))
        return report
    gens = {n: (e.tokenizer, e.generation_config) for n, e in entries.items()}
    try:
        stops = sorted(stop_ids(cfg, gens, vocab))
    except FamilyError as exc:
        report.problems.append(str(exc))
        stops = []
    report.lines.append(f"vocabulary: {vocab} token ids shared; stop ids: {stops}")
    context = min(e.max_positions for e in entries.values())
    cap = max_model_len or cfg.max_model_len
    if cap is not None and cap > context:
        report.problems.append(
            f"max_model_len {cap} exceeds the family's context limit {context} (the smallest "
            "max_position_embeddings of its models)"
        )
    context = min(context, cap or context)
    report.lines.append(f"context: {context} tokens")
    _boundary(cfg, entries, report)
    _fit(entries, context, gpu_memory_utilization, report)
    return report


def _entries(cfg: FamilyConfig, device: str | None, dtype: str | None) -> dict[str, EntryReport]:
    order = [cfg.base, *([cfg.reference] if cfg.reference else []), *cfg.experts]
    order += [n for n in cfg.models if n not in order]
    seen: dict[Checkpoint, str] = {}
    out: dict[str, EntryReport] = {}
    configs: dict[tuple, Any] = {}
    tokenizers: dict[tuple, Any] = {}
    for name in sorted(order, key=lambda n: cfg.models[n].adapter is not None):
        spec = cfg.models[name]
        if spec.adapter is not None:
            of = out[spec.of]  # type: ignore[index]
            tokenizer = loading.adapter_tokenizer(name, spec.adapter, of.tokenizer)
            rep = EntryReport(name, of.device, of.dtype, of.params, 0, of.kv_bytes_per_token,
                              of.max_positions, f"adapter {spec.adapter} over {spec.of}",
                              of.shares_weights_with or of.name, tokenizer, spec.chat_template,
                              of.vocab_rows, of.generation_config)  # fmt: skip
            out[name] = rep
            continue
        ckpt, config = _entry(name, spec, device, dtype, configs)
        key = (ckpt.path, ckpt.gguf_file, ckpt.revision)
        if key not in tokenizers:  # reading a GGUF file's metadata takes seconds: once
            with _quiet():
                tokenizers[key] = loading.load_tokenizer(name, ckpt)
        tokenizer = tokenizers[key]
        try:
            params, kv = _meta_sizes(config, ckpt.dtype)
        except UnsupportedModelError as exc:
            raise FamilyError(f"model {name!r}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - an architecture transformers cannot build
            raise loading.load_failure(name, repr(ckpt.source), exc) from exc
        text = config.get_text_config(decoder=True)
        max_positions = getattr(text, "max_position_embeddings", None)
        owner = seen.setdefault(ckpt, name)
        rep = EntryReport(
            name, ckpt.device, ckpt.dtype, params,
            0 if owner != name else params * ckpt.dtype.itemsize, kv,
            int(min(max_positions or tokenizer.model_max_length, 1 << 30)), ckpt.source,
            owner if owner != name else None, tokenizer, spec.chat_template,
            text.vocab_size, _generation_config(ckpt, config),
        )  # fmt: skip
        out[name] = rep
    return {n: out[n] for n in order}


def _boundary(cfg: FamilyConfig, entries: dict[str, EntryReport], report: Report) -> None:
    if not cfg.experts:
        report.lines.append("answer boundary: no experts, nothing is composed")
        return
    renderers = {n: (e.tokenizer, e.template) for n, e in entries.items()}
    ws = family_answer_whitespace(cfg, renderers)
    composed = [cfg.base, cfg.reference, *cfg.experts]
    try:
        verdict = boundary.textual_verdict({n: renderers[n] for n in composed if n}, ws)
    except Exception as exc:  # noqa: BLE001 - a template that cannot render a plain chat
        report.problems.append(f"answer boundary: cannot render the probe chat: {exc}")
        return
    report.lines.append(verdict.line())
    report.lines.append(
        "  (the first answer token each model prefers needs the weights: the server compares "
        "it at startup and logs one warning line if the models disagree)"
    )


def _device_memory(device: str) -> tuple[int | None, str]:
    """Bytes the server may use on `device` (None: not present here) and a description."""
    if device == "cpu":
        return physical_memory(), "cpu (physical memory)"
    if not torch.cuda.is_available():
        return None, f"{device}: no CUDA device is visible on this machine"
    count = torch.cuda.device_count()
    if device == "auto":
        total = sum(torch.cuda.get_device_properties(i).total_memory for i in range(count))
        return total, f"auto ({count} GPUs)"
    index = int(device.partition(":")[2] or torch.cuda.current_device())
    if index >= count:
        return None, f"{device}: this machine has {count} CUDA device(s)"
    props = torch.cuda.get_device_properties(index)
    return props.total_memory, f"cuda:{index} ({props.name})"


def _fit(entries: dict[str, EntryReport], context: int, utilization: float, report: Report) -> None:
    by_device: dict[str, list[EntryReport]] = {}
    for e in entries.values():
        by_device.setdefault(e.device, []).append(e)
    for device, group in by_device.items():
        weights = sum(e.weight_bytes for e in group)
        kv = context * sum(e.kv_bytes_per_token for e in group)
        memory, what = _device_memory(device)
        if memory is None:
            report.lines.append(f"memory: {what}")
            report.problems.append(f"device {device} of {', '.join(e.name for e in group)}: {what}")
            continue
        usable = memory if device == "cpu" else int(memory * utilization) - ACTIVATION_MARGIN
        need = weights + kv
        fits = need <= usable
        report.lines.append(
            f"memory: {what}: weights {_bytes(weights)} + KV of one {context}-token sequence "
            f"in each of its {len(group)} entries {_bytes(kv)} = {_bytes(need)} "
            f"{'<=' if fits else '>'} {_bytes(usable)} usable: "
            + (f"fits, KV room for {(usable - weights) // max(kv // context, 1)} tokens per entry"
               if fits else "does not fit")
        )  # fmt: skip
        if not fits:
            report.problems.append(
                f"{device} cannot hold the weights and one full-context sequence of "
                f"{', '.join(e.name for e in group)} ({_bytes(need)} > {_bytes(usable)}); "
                "lower --max-model-len, use a smaller dtype, or spread the base (device: auto)"
            )
