"""A model family: its YAML config, its loaded models, and the vocabulary they share.

EFT combines log-probabilities token by token, so every model must map every token string to
the same id. `load_family` checks that at startup, comparing vocabularies rather than special
tokens (a base and its instruct checkpoint declare different BOS/EOS), cuts every model's
logits to the shared part (a strict-prefix vocabulary, a padded embedding matrix), takes the
union of the models' EOS ids as the ids that end generation, and takes the context limit as the
smallest `max_position_embeddings` (or `max_model_len`). A family may hold a single model.
Entries naming the same checkpoint share one module, and an adapter entry shares its model's
weights (see `decoding.loading`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from . import boundary, loading
from .chat import chat_ids
from .errors import FamilyError
from .loading import DTYPES, Checkpoint, LoadedModel

__all__ = ["DTYPES", "FILTER_KEYS", "Family", "FamilyConfig", "FamilyError", "LoadedModel"]

log = logging.getLogger(__name__)

FILTER_KEYS = ("base_top_p", "plausibility")


class ModelSpec(BaseModel):
    """One entry of `models:`: a checkpoint (`path`), or a LoRA `adapter` over another entry."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="local directory, hub id, a .gguf file, or the folder of `gguf_file`"
    )
    adapter: str | None = Field(None, description="PEFT LoRA adapter directory (needs `of`)")
    of: str | None = Field(None, description="the entry whose weights the adapter applies to")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str | None = Field(None, description="cpu | cuda | cuda:N | auto (device_map=auto)")
    gguf_file: str | None = None
    chat_template: str = Field(
        "tokenizer", description='"tokenizer" (its own), "plain" (User:/Assistant:), or Jinja'
    )
    revision: str | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is None or v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, not {v!r}")

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if (self.path is None) == (self.adapter is None):
            raise ValueError("give exactly one of `path` (a model) and `adapter` (with `of`)")
        if self.adapter is not None:
            if self.of is None:
                raise ValueError("an `adapter` needs `of`: the entry whose weights it adapts")
            extra = [k for k in ("dtype", "device", "gguf_file", "revision") if getattr(self, k)]
            if extra:
                raise ValueError(
                    f"an adapter runs on the weights of its `of` entry; set {', '.join(extra)} "
                    "there"
                )
        elif self.of is not None:
            raise ValueError("`of` belongs to an `adapter` entry")
        return self


class FamilyConfig(BaseModel):
    """The family YAML (docs/family.md). Only `name`, `models` and `base` are required."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    models: dict[str, ModelSpec] = Field(min_length=1)
    base: str
    reference: str | None = None
    experts: list[str] = Field(default_factory=list)
    defaults: dict[str, float] = Field(default_factory=dict)
    max_weight: float = Field(4.0, gt=0, description="upper bound of an expert weight")
    stop_token_ids: list[int] | None = Field(
        None, description="ids that end generation; default: every model's EOS ids"
    )
    max_model_len: int | None = Field(
        None, ge=1, description="cap on prompt + output tokens; default: the models' limit"
    )
    draft: str | None = Field(
        None, description="the entry that drafts for speculative decoding (not the base)"
    )

    @model_validator(mode="after")
    def _roles(self) -> FamilyConfig:
        names = set(self.models)
        for field_name, value in (("base", self.base), ("reference", self.reference)):
            if value is not None and value not in names:
                raise ValueError(f"{field_name}: {value!r} is not one of models {sorted(names)}")
        if self.experts and self.reference is None:
            raise ValueError("experts need a `reference`: the model they were fine-tuned from")
        if self.draft is not None:
            if self.draft not in names:
                raise ValueError(f"draft: {self.draft!r} is not one of models {sorted(names)}")
            if self.draft == self.base:
                raise ValueError("draft: the base cannot draft for itself; name a smaller entry")
        if self.base == self.reference:
            raise ValueError(
                "base and reference must be different entries (list one checkpoint under two "
                "names to use it in both roles: the entries share its weights)"
            )
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("experts: names repeat")
        for e in self.experts:
            if e not in names:
                raise ValueError(f"experts: {e!r} is not one of models {sorted(names)}")
            if e in (self.base, self.reference):
                raise ValueError(f"experts: {e!r} is also the base or the reference")
        for name, spec in self.models.items():
            if spec.of is not None:
                if spec.of not in names:
                    raise ValueError(f"models.{name}.of: {spec.of!r} is not one of the models")
                if self.models[spec.of].adapter is not None:
                    raise ValueError(f"models.{name}.of: {spec.of!r} is itself an adapter")
        for key, value in self.defaults.items():
            if key not in self.experts and key not in FILTER_KEYS:
                raise ValueError(f"defaults: {key!r} is neither an expert nor one of {FILTER_KEYS}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"defaults: {key} must be a finite number >= 0")
        if self.stop_token_ids is not None and any(i < 0 for i in self.stop_token_ids):
            raise ValueError("stop_token_ids must be token ids >= 0")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> FamilyConfig:
        """Parse and validate a family YAML; model paths are relative to the file's folder."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise FamilyError(f"cannot read family config {path}: {exc}") from exc
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as exc:
            errs = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in exc.errors()
            )
            raise FamilyError(f"invalid family config {path}: {errs}") from exc
        for spec in cfg.models.values():
            for attr in ("path", "adapter"):
                value = getattr(spec, attr)
                if value is not None and not Path(value).is_absolute():
                    local = path.parent / value
                    if local.exists():
                        setattr(spec, attr, str(local.resolve()))
        return cfg

    @classmethod
    def single(
        cls, path: str, gguf_file: str | None = None, name: str | None = None, **spec: Any
    ) -> FamilyConfig:
        """A family of one model (`eft-serve --model PATH`): no knobs, the model alone."""
        name = name or served_name(path, gguf_file)
        try:
            return cls(
                name=name,
                models={name: ModelSpec(path=path, gguf_file=gguf_file, **spec)},
                base=name,
            )
        except ValidationError as exc:
            raise FamilyError(f"--model {path}: {exc.errors()[0]['msg']}") from exc


def served_name(path: str, gguf_file: str | None = None) -> str:
    """The id a single model is served under: its file or folder name, without `.gguf`."""
    leaf = Path(gguf_file or path.rstrip("/")).name.removesuffix(".gguf")
    clean = "".join(c if c.isalnum() or c in "._-" else "-" for c in leaf).strip(".-")
    return clean or "model"


@dataclass
class Family:
    config: FamilyConfig
    models: dict[str, LoadedModel]
    tokenizer: PreTrainedTokenizerBase  # the base's: encode / decode
    vocab_size: int  # shared width every model's logits are cut to
    context_limit: int
    eos_token_ids: frozenset[int]  # every id that ends generation
    device: torch.device  # where log-probs are combined and sampled (the base's output device)
    # What `plain` renderings end with after `Assistant:`: the whitespace the family's chat
    # templates end their generation prompt with, so every model starts the answer alike.
    answer_whitespace: str = ""

    @property
    def name(self) -> str:
        return self.config.name

    def render_chat(self, messages: list[dict[str, Any]]) -> dict[str, list[int]]:
        """Each model's prompt tokens for a chat, rendered with that model's own template."""
        ws = self.answer_whitespace
        return {name: render_chat(m, messages, ws) for name, m in self.models.items()}


def render_chat(
    model: LoadedModel, messages: list[dict[str, Any]], answer_ws: str = ""
) -> list[int]:
    """A chat's prompt ids with this model's template (`plain` ends with `answer_ws` after
    `Assistant:`); message content is tokenized as text (a special token's text in it is not
    the special token: `decoding.chat`)."""
    tok = model.tokenizer
    template = boundary.effective_template(tok, model.chat_template)
    if template == "plain":

        def plain(msgs: list[dict[str, Any]]) -> str:
            return boundary.plain_text(msgs, answer_ws)

        return chat_ids(tok, plain, messages, add_special_tokens=True)
    kwargs: dict[str, Any] = {} if template == "tokenizer" else {"chat_template": template}

    def jinja(msgs: list[dict[str, Any]]) -> str:
        # What apply_chat_template(tokenize=True) tokenizes, without special tokens added.
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)

    return chat_ids(tok, jinja, messages, add_special_tokens=False)


def load_family(
    config: FamilyConfig | str | Path,
    device: str | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
) -> Family:
    """Load every model of the family and check that they can be combined.

    `device`/`dtype` override every model's own setting (the CLI's --device/--dtype);
    `max_model_len` caps the context (the CLI's --max-model-len; default: the config's).
    """
    if not isinstance(config, FamilyConfig):
        config = FamilyConfig.from_yaml(config)
    # Base first, then reference and experts: the order logs and metrics list them in.
    order = [config.base, *([config.reference] if config.reference else []), *config.experts]
    order += [n for n in config.models if n not in order]
    modules: dict[Checkpoint, LoadedModel] = {}
    tokenizers: dict[tuple[str, str | None, str | None], PreTrainedTokenizerBase] = {}
    models: dict[str, LoadedModel] = {}
    trees: dict[int, Any] = {}  # id of a plain module -> the PEFT model of its adapters
    # Adapters load after the entries they adapt (a stable sort keeps the rest in order).
    for name in sorted(order, key=lambda n: config.models[n].adapter is not None):
        spec = config.models[name]
        if spec.adapter is not None:
            models[name] = _load_adapter_entry(name, spec, models[spec.of], trees)
        else:
            models[name] = _load_entry(name, spec, device, dtype, modules, tokenizers)
        m = models[name]
        log.info(
            "loaded %s (%.1fM params, %s, %s) from %s%s",
            name,
            m.num_params / 1e6,
            m.input_device,
            str(m.dtype).removeprefix("torch."),
            spec.path or f"adapter {spec.adapter} over {spec.of}",
            f" [shares the weights of {m.shares_weights_with}]" if m.shares_weights_with else "",
        )
    models = {n: models[n] for n in order}
    vocab_size = shared_vocab_size(
        {n: m.tokenizer for n, m in models.items()},
        {n: m.module.get_output_embeddings().weight.shape[0] for n, m in models.items()},
    )
    limit = min(m.max_positions for m in models.values())
    cap = max_model_len or config.max_model_len
    if cap is not None:
        if cap > limit:
            raise FamilyError(
                f"max_model_len {cap} exceeds the family's context limit {limit} (the smallest "
                "max_position_embeddings of its models)"
            )
        limit = cap
    base = models[config.base]
    answer_ws = family_answer_whitespace(
        config, {n: (m.tokenizer, m.chat_template) for n, m in models.items()}
    )
    return Family(
        config=config,
        models=models,
        tokenizer=base.tokenizer,
        vocab_size=vocab_size,
        context_limit=limit,
        eos_token_ids=stop_ids(
            config,
            {
                n: (m.tokenizer, getattr(m.module, "generation_config", None))
                for n, m in models.items()
            },
            vocab_size,
        ),
        device=base.output_device,
        answer_whitespace=answer_ws,
    )


def _load_entry(
    name: str,
    spec: ModelSpec,
    device: str | None,
    dtype: str | None,
    modules: dict[Checkpoint, LoadedModel],
    tokenizers: dict[tuple[str, str | None, str | None], PreTrainedTokenizerBase],
) -> LoadedModel:
    path, gguf_file = loading.split_gguf_path(spec.path, spec.gguf_file)
    dev = loading.resolve_device(device or spec.device)
    ckpt = Checkpoint(
        path=path,
        gguf_file=gguf_file,
        revision=spec.revision,
        dtype=loading.resolve_dtype(dtype or spec.dtype, dev),
        device=dev,
    )
    owner = modules.get(ckpt)
    if owner is None:
        loading.check_exists(name, ckpt)
    key = (ckpt.path, ckpt.gguf_file, ckpt.revision)
    if key not in tokenizers:
        tokenizers[key] = loading.load_tokenizer(name, ckpt)
    tokenizer = tokenizers[key]
    module = owner.module if owner else loading.load_module(name, ckpt)
    loaded = _loaded(name, module, tokenizer, ckpt.dtype, spec.chat_template)
    if owner is None:
        modules[ckpt] = loaded
    else:
        loaded.shares_weights_with = owner.name
    return loaded


def _load_adapter_entry(
    name: str, spec: ModelSpec, of: LoadedModel, trees: dict[int, Any]
) -> LoadedModel:
    """The adapter in a module tree of its own first; a plain LoRA adapter then joins (or
    becomes) the tree its model's other plain adapters share, so that they run as one
    forward."""
    key = id(of.module)
    tree = loading.load_adapter(name, spec.adapter, of.module)
    batched = loading.is_plain_lora(name, tree)
    if batched:
        if key in trees:
            trees[key].load_adapter(spec.adapter, adapter_name=name, is_trainable=False)
            tree = trees[key]
        else:
            trees[key] = tree
    tokenizer = loading.adapter_tokenizer(name, spec.adapter, of.tokenizer)
    loaded = _loaded(name, tree.get_base_model(), tokenizer, of.dtype, spec.chat_template)
    loaded.shares_weights_with = of.shares_weights_with or of.name
    loaded.adapter = name if batched else None
    return loaded


def _loaded(
    name: str,
    module: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    chat_template: str,
) -> LoadedModel:
    # Image-text checkpoints (Gemma-3 4B+) keep the language model's limits in a text config.
    text_config = module.config.get_text_config()
    max_positions = getattr(text_config, "max_position_embeddings", None)
    return LoadedModel(
        name=name,
        module=module,
        tokenizer=tokenizer,
        input_device=module.get_input_embeddings().weight.device,
        output_device=module.get_output_embeddings().weight.device,
        dtype=dtype,
        num_params=sum(p.numel() for p in module.parameters()),
        max_positions=int(min(max_positions or tokenizer.model_max_length, 1 << 30)),
        chat_template=chat_template,
    )


def shared_vocab_size(
    tokenizers: dict[str, PreTrainedTokenizerBase], widths: dict[str, int]
) -> int:
    """The number of leading token ids every model of the family reads the same way.

    Every token id below the result means the same string to every model's tokenizer and has a
    row in every model's output embedding (`widths`: its rows). Tokens past it (a strict-prefix
    vocabulary, added tokens, padded embedding rows) are cut. Two models that read one id as
    different strings are a `FamilyError` naming both models and the first differing token.
    """
    tables = {name: _id_table(tok) for name, tok in tokenizers.items()}
    first_name, first = next(iter(tables.items()))
    for name, table in tables.items():
        n = min(len(first), len(table))
        if first[:n] != table[:n]:
            i = next(i for i in range(n) if first[i] != table[i])
            raise FamilyError(
                f"models {first_name!r} and {name!r} have different vocabularies: token id {i} "
                f"is {first[i]!r} in {first_name!r} but {table[i]!r} in {name!r}; EFT needs "
                "models that map every token to the same id"
            )
    size = min(*(len(t) for t in tables.values()), *widths.values())
    for name, table in tables.items():
        if len(table) > size:
            log.info(
                "model %s: token ids >= %d (%d tokens, e.g. %r) are outside the family's "
                "shared vocabulary and are never sampled",
                name,
                size,
                len(table) - size,
                table[size],
            )
    return size


def _id_table(tok: PreTrainedTokenizerBase) -> list[str | None]:
    vocab = tok.get_vocab()
    table: list[str | None] = [None] * (max(vocab.values(), default=-1) + 1)
    for token, i in vocab.items():
        table[i] = token
    return table


def family_answer_whitespace(
    config: FamilyConfig, renderers: dict[str, tuple[PreTrainedTokenizerBase, str]]
) -> str:
    """What `plain` ends with in this family ({entry: (tokenizer, chat_template)}): experts
    first, so that a base rendered `plain` starts its answer as the composed chat models do."""
    order = [*config.experts, *(n for n in renderers if n not in config.experts)]
    return boundary.answer_whitespace(renderers[n] for n in order if n in renderers)


def stop_ids(
    config: FamilyConfig,
    eos_sources: dict[str, tuple[PreTrainedTokenizerBase, Any]],
    vocab_size: int,
) -> frozenset:
    """The ids that end generation: the config's `stop_token_ids`, else the union of every
    model's EOS and its generation config's `eos_token_id` (Llama-3 instruct lists three);
    `eos_sources` is {entry: (tokenizer, generation config or None)}."""
    if config.stop_token_ids is not None:
        outside = [i for i in config.stop_token_ids if i >= vocab_size]
        if outside:
            raise FamilyError(
                f"stop_token_ids {outside} are outside the shared vocabulary (size {vocab_size})"
            )
        return frozenset(config.stop_token_ids)
    ids: set[int] = set()
    for tokenizer, generation_config in eos_sources.values():
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        gen = getattr(generation_config, "eos_token_id", None)
        ids.update([gen] if isinstance(gen, int) else gen or [])
    return frozenset(i for i in ids if i is not None and 0 <= i < vocab_size)
