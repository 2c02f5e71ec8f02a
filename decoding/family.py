"""A model family: its YAML config, its loaded models, and the one tokenizer they share.

EFT combines log-probabilities token by token, so every model must index the same vocabulary.
`load_family` checks that at startup (vocabulary and special tokens of every model's tokenizer),
cuts logits of models with padded embedding matrices to the shared width, and takes the
family's context limit as the smallest `max_position_embeddings`.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FILTER_KEYS = ("base_top_p", "plausibility")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FamilyError(Exception):
    """The family cannot be loaded (bad config, missing model, tokenizers that differ)."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="local directory, hub id, or directory holding `gguf_file`")
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


class FamilyConfig(BaseModel):
    """The family YAML (DESIGN §3)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    models: dict[str, ModelSpec]
    base: str
    reference: str
    experts: list[str] = Field(min_length=1)
    defaults: dict[str, float] = Field(default_factory=dict)
    max_weight: float = Field(4.0, gt=0, description="upper bound of an expert weight")

    @model_validator(mode="after")
    def _roles(self) -> FamilyConfig:
        names = set(self.models)
        for field_name, value in (("base", self.base), ("reference", self.reference)):
            if value not in names:
                raise ValueError(f"{field_name}: {value!r} is not one of models {sorted(names)}")
        if self.base == self.reference:
            raise ValueError("base and reference must be different models")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("experts: names repeat")
        for e in self.experts:
            if e not in names:
                raise ValueError(f"experts: {e!r} is not one of models {sorted(names)}")
            if e in (self.base, self.reference):
                raise ValueError(f"experts: {e!r} is also the base or the reference")
        for key, value in self.defaults.items():
            if key not in self.experts and key not in FILTER_KEYS:
                raise ValueError(f"defaults: {key!r} is neither an expert nor one of {FILTER_KEYS}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"defaults: {key} must be a finite number >= 0")
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
            local = path.parent / spec.path
            if not Path(spec.path).is_absolute() and local.exists():
                spec.path = str(local.resolve())
        return cfg


@dataclass
class LoadedModel:
    name: str
    module: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase  # this model's own (for its chat template)
    input_device: torch.device
    output_device: torch.device
    dtype: torch.dtype
    num_params: int
    max_positions: int
    chat_template: str


@dataclass
class Family:
    config: FamilyConfig
    models: dict[str, LoadedModel]
    tokenizer: PreTrainedTokenizerBase  # shared: encode / decode
    vocab_size: int  # shared width every model's logits are cut to
    context_limit: int
    eos_token_ids: frozenset[int]
    device: torch.device  # where log-probs are combined and sampled (the base's output device)

    @property
    def name(self) -> str:
        return self.config.name

    def render_chat(self, messages: list[dict[str, Any]]) -> dict[str, list[int]]:
        """Each model's prompt tokens for a chat, rendered with that model's own template."""
        return {name: render_chat(m, messages) for name, m in self.models.items()}


def render_chat(model: LoadedModel, messages: list[dict[str, Any]]) -> list[int]:
    tok = model.tokenizer
    template = model.chat_template
    if template == "tokenizer" and not tok.chat_template:
        template = "plain"
    if template == "plain":
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        text = "\n".join(lines) + "\nAssistant:"
        return tok.encode(text, add_special_tokens=True)
    kwargs: dict[str, Any] = {} if template == "tokenizer" else {"chat_template": template}
    out = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs
    )
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def _resolve_device(spec: ModelSpec, override: str | None) -> str:
    device = override or spec.device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(spec: ModelSpec, override: str | None, device: str) -> torch.dtype:
    name = override or spec.dtype or ("float32" if device == "cpu" else "bfloat16")
    if name not in DTYPES:
        raise FamilyError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}")
    return DTYPES[name]


def _load_model(
    name: str, spec: ModelSpec, device_override: str | None, dtype_override: str | None
) -> LoadedModel:
    device = _resolve_device(spec, device_override)
    dtype = _resolve_dtype(spec, dtype_override, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    if spec.revision:
        kwargs["revision"] = spec.revision
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            spec.path, **{k: v for k, v in kwargs.items() if k in ("gguf_file", "revision")}
        )
        module = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise FamilyError(f"model {name!r}: cannot load {spec.path!r}: {exc}") from exc
    if device != "auto":
        module.to(device)
    module.eval()
    module.requires_grad_(False)
    input_device = module.get_input_embeddings().weight.device
    output_device = module.get_output_embeddings().weight.device
    cfg = module.config
    max_positions = getattr(cfg, "max_position_embeddings", None) or tokenizer.model_max_length
    return LoadedModel(
        name=name,
        module=module,
        tokenizer=tokenizer,
        input_device=input_device,
        output_device=output_device,
        dtype=dtype,
        num_params=sum(p.numel() for p in module.parameters()),
        max_positions=int(min(max_positions, 1 << 30)),
        chat_template=spec.chat_template,
    )


def check_same_tokenizer(models: dict[str, LoadedModel]) -> None:
    """Refuse a family whose models index different vocabularies or special tokens."""
    items = list(models.items())
    first_name, first = items[0]
    ref_vocab = first.tokenizer.get_vocab()
    ref_special = _special_ids(first.tokenizer)
    for name, m in items[1:]:
        vocab = m.tokenizer.get_vocab()
        if vocab != ref_vocab:
            diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()), key=lambda kv: kv[1])[:3]
            raise FamilyError(
                f"models {first_name!r} and {name!r} have different vocabularies "
                f"({len(ref_vocab)} vs {len(vocab)} tokens; first differences {diff}); "
                "EFT needs one shared tokenizer"
            )
        special = _special_ids(m.tokenizer)
        if special != ref_special:
            raise FamilyError(
                f"models {first_name!r} and {name!r} have different special tokens "
                f"({ref_special} vs {special}); EFT needs one shared tokenizer"
            )


def _special_ids(tok: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}


def load_family(
    config: FamilyConfig | str | Path,
    device: str | None = None,
    dtype: str | None = None,
) -> Family:
    """Load every model of the family and check that they can be combined.

    `device`/`dtype` override every model's own setting (the CLI's --device/--dtype).
    """
    if not isinstance(config, FamilyConfig):
        config = FamilyConfig.from_yaml(config)
    # Base first, then reference and experts: the order logs and metrics list them in.
    order = [config.base, config.reference, *config.experts]
    order += [n for n in config.models if n not in order]
    models = {}
    for name in order:
        models[name] = _load_model(name, config.models[name], device, dtype)
        m = models[name]
        log.info(
            "loaded %s (%.1fM params, %s, %s) from %s",
            name,
            m.num_params / 1e6,
            m.input_device,
            str(m.dtype).removeprefix("torch."),
            config.models[name].path,
        )
    check_same_tokenizer(models)
    tokenizer = models[config.base].tokenizer
    widths = {n: m.module.get_output_embeddings().weight.shape[0] for n, m in models.items()}
    vocab_size = min(len(tokenizer), *widths.values())
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for m in models.values():
        gen_eos = getattr(getattr(m.module, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(gen_eos)
    return Family(
        config=config,
        models=models,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        context_limit=min(m.max_positions for m in models.values()),
        eos_token_ids=frozenset(e for e in eos if e is not None and e < vocab_size),
        device=models[config.base].output_device,
    )
