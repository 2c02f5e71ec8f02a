"""Loading the weights and tokenizers of a family's entries, once per distinct checkpoint.

Entries that name the same checkpoint (path, revision, GGUF file, dtype, device) share one
module: "the same model under two chat templates" costs no extra memory, and a GGUF listed
three times is dequantised once. The adapter entries (`{adapter: DIR, of: ENTRY}`) over one
set of weights share one structural copy of that model whose weight and buffer tensors are the
very same objects, with every adapter's PEFT LoRA layers injected into the copy only: an expert
costs its LoRA matrices, and the runner can run the base rows and every adapter's rows in one
forward, choosing each row's adapter (`AdapterSwitch`).

Every failure is a `FamilyError` whose message is one line naming the entry; the full
traceback goes to the debug log.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .errors import FamilyError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The package a missing import belongs to, for the one-line error's install hint.
PACKAGE_OF = {"gguf": "gguf", "peft": "peft", "sentencepiece": "sentencepiece"}


@dataclass(frozen=True)
class Checkpoint:
    """Everything that decides which weights an entry gets: equal checkpoints share a module."""

    path: str
    gguf_file: str | None
    revision: str | None
    dtype: torch.dtype
    device: str  # cpu | cuda | cuda:N | auto

    @property
    def source(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


@dataclass
class LoadedModel:
    name: str
    module: torch.nn.Module  # shared between entries of the same checkpoint
    tokenizer: PreTrainedTokenizerBase  # this model's own (its BOS and chat template)
    input_device: torch.device
    output_device: torch.device
    dtype: torch.dtype
    num_params: int
    max_positions: int
    chat_template: str
    shares_weights_with: str | None = None  # the entry whose loaded module this one uses
    # A plain LoRA adapter's name inside `module`, which holds every such adapter over the same
    # weights: calling `module` directly runs PEFT's active adapter; the runner picks each row's
    # own. None for a model, and for an adapter in a module of its own (DoRA, ...).
    adapter: str | None = None


def split_gguf_path(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """`path: dir/model.gguf` without `gguf_file` means `path: dir, gguf_file: model.gguf`."""
    if gguf_file is None and path.endswith(".gguf") and Path(path).is_file():
        p = Path(path)
        return str(p.parent), p.name
    return path, gguf_file


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    name = name or ("float32" if device == "cpu" else "bfloat16")
    if name not in DTYPES:
        raise FamilyError(f"dtype must be one of {sorted(DTYPES)}, not {name!r}")
    return DTYPES[name]


def _looks_local(path: str) -> bool:
    # A hub id is `name` or `org/name`; anything else that does not exist is a missing path.
    return (
        Path(path).is_absolute()
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or path.endswith(".gguf")
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def load_failure(entry: str, what: str, exc: BaseException) -> FamilyError:
    """The one-line error for a failed load of `what` (a path, an adapter) of `entry`."""
    log.debug("loading %s of model %r failed", what, entry, exc_info=exc)
    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None) or ""
        package = PACKAGE_OF.get(missing.split(".")[0])
        if package is None:  # transformers words missing packages in the message
            package = next((p for p in PACKAGE_OF.values() if p in str(exc).lower()), None)
        if package:
            return FamilyError(
                f"model {entry!r}: loading {what} needs the Python package {package!r} "
                f"(pip install {package})"
            )
    return FamilyError(f"model {entry!r}: cannot load {what}: {_one_line(exc)}")


def check_exists(entry: str, ckpt: Checkpoint) -> None:
    """Answer the common mistakes in one line before transformers gets to them."""
    if ckpt.gguf_file and importlib.util.find_spec("gguf") is None:
        raise FamilyError(
            f"model {entry!r}: loading the GGUF file {ckpt.gguf_file!r} needs the Python package "
            "'gguf' (pip install gguf, or reinstall eft-serve with its dependencies)"
        )
    path = Path(ckpt.path).expanduser()
    if not path.exists():
        if _looks_local(ckpt.path):
            raise FamilyError(f"model {entry!r}: no such file or directory: {ckpt.path}")
        return  # a hub id: transformers resolves it (and says so if the machine has no hub)
    if ckpt.gguf_file and not (path / ckpt.gguf_file).is_file():
        raise FamilyError(f"model {entry!r}: no GGUF file {ckpt.gguf_file!r} in {ckpt.path}")


def load_tokenizer(entry: str, ckpt: Checkpoint) -> PreTrainedTokenizerBase:
    kwargs = {k: v for k, v in (("gguf_file", ckpt.gguf_file), ("revision", ckpt.revision)) if v}
    try:
        return AutoTokenizer.from_pretrained(ckpt.path, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one line naming the entry
        raise load_failure(entry, f"the tokenizer of {ckpt.source!r}", exc) from exc


def load_module(entry: str, ckpt: Checkpoint) -> torch.nn.Module:
    kwargs: dict[str, Any] = {"dtype": ckpt.dtype}
    if ckpt.gguf_file:
        kwargs["gguf_file"] = ckpt.gguf_file
    if ckpt.revision:
        kwargs["revision"] = ckpt.revision
    if ckpt.device == "auto":
        kwargs["device_map"] = "auto"
    try:
        module = AutoModelForCausalLM.from_pretrained(ckpt.path, **kwargs)
        if ckpt.device != "auto":
            module.to(ckpt.device)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one line naming the entry
        raise load_failure(entry, repr(ckpt.source), exc) from exc
    return _frozen(module)


def load_adapter(entry: str, adapter: str, of: torch.nn.Module, tree: Any = None) -> Any:
    """A PEFT model holding the LoRA adapter in `adapter` (named `entry`) over `of`'s weights:
    loaded into `tree` beside the adapters already there, or, without one, into a copy of
    `of`'s module tree whose parameters and buffers are `of`'s own objects (deepcopy's memo
    returns them as they are), since PEFT injects its LoRA layers into the model it is given
    and `of` itself must stay a plain model.
    """
    if not Path(adapter).expanduser().exists() and _looks_local(adapter):
        raise FamilyError(f"model {entry!r}: no such adapter directory: {adapter}")
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise load_failure(entry, f"the adapter {adapter!r}", exc) from exc
    try:
        with warnings.catch_warnings():  # PEFT calls APIs transformers 5 marks as deprecated
            warnings.simplefilter("ignore", FutureWarning)
            if tree is None:
                shared = {id(t): t for t in (*of.parameters(), *of.buffers())}
                skeleton = copy.deepcopy(of, memo=shared)
                tree = PeftModel.from_pretrained(
                    skeleton, adapter, adapter_name=entry, is_trainable=False
                )
            else:
                tree.load_adapter(adapter, adapter_name=entry, is_trainable=False)
        if tree.peft_config[entry].peft_type.value != "LORA":
            raise ValueError(f"a {tree.peft_config[entry].peft_type.value} adapter, not LoRA")
    except Exception as exc:  # noqa: BLE001 - any failure becomes one line naming the entry
        raise load_failure(entry, f"the adapter {adapter!r}", exc) from exc
    _frozen(tree.get_base_model())
    return tree


def is_plain_lora(entry: str, tree: Any) -> bool:
    """Whether `AdapterSwitch` computes the adapter `entry` of `tree` exactly: LoRA on linear
    layers only, no DoRA-style variant, no fully trained modules (`modules_to_save`) or token
    rows of its own. Other adapters run alone, through PEFT's own forward."""
    from peft.tuners.lora import Linear, LoraLayer

    config = tree.peft_config[entry]
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return False
    for m in tree.modules():
        if not isinstance(m, LoraLayer):
            continue
        if entry in getattr(m, "lora_embedding_A", {}):
            return False
        if entry in m.lora_A and (not isinstance(m, Linear) or entry in m.lora_variant):
            return False
    return True


class AdapterSwitch:
    """Runs each row of a forward through its own LoRA adapter, in a module holding several.

    Inside `rows(names)` every LoRA layer computes its base layer only (PEFT's adapters
    switched off), and a forward hook, installed once per layer, adds each adapter's
    `B(A(x)) * scaling` to that adapter's rows: a contiguous slice where the rows are (as the
    runner lays out a prefill or a sparse decode), an index otherwise. The rows of each adapter
    are worked out once per forward, not per layer (PEFT's own mixed-batch path does that per
    layer, which costs more than the LoRA matrices on small models). The name `BASE` adds none.
    Outside `rows(...)` the layers behave as PEFT made them (its active adapter).
    """

    BASE = "__base__"

    def __init__(self, module: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
        self.plan: list[tuple[str, slice | torch.Tensor]] | None = None
        self._on: dict[torch.device, list] = {}
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor] | None] = {}
        self.batch = 0  # rows of the current forward
        for layer in self.layers:
            layer.register_forward_hook(self._add_deltas)

    @contextlib.contextmanager
    def rows(self, names: list[str]):
        plan: list[tuple[str, slice | torch.Tensor]] = []
        for adapter in dict.fromkeys(names):
            if adapter == self.BASE:
                continue
            idx = [i for i, n in enumerate(names) if n == adapter]
            contiguous = idx[-1] - idx[0] + 1 == len(idx)
            plan.append((adapter, slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx)))
        saved = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True
        self.plan, self._on, self.batch = plan, {}, len(names)
        try:
            yield
        finally:
            self.plan = None
            for layer, was in zip(self.layers, saved):
                layer._disable_adapters = was

    def _add_deltas(self, layer, args, output):
        if not self.plan:
            return output
        x = args[0].reshape(-1, args[0].shape[-1])  # one row per token of the forward
        out_rows = output.view(-1, output.shape[-1])
        if x.shape[0] != self.batch:
            raise RuntimeError(
                f"a LoRA layer ({type(layer.base_layer).__name__}) sees {x.shape[0]} rows, "
                f"not one per token of the forward ({self.batch}): its adapters cannot be batched"
            )
        plan = self._on.get(x.device)
        if plan is None:  # layers spread over devices get the indices on their own
            plan = self._on[x.device] = [
                (a, r if isinstance(r, slice) else r.to(x.device)) for a, r in self.plan
            ]
        for adapter, rows in plan:
            weights = self._weights(layer, adapter)
            if weights is None:
                continue
            a, b = weights
            if isinstance(rows, slice):
                out = out_rows[rows]  # a view: the delta lands in `output`
                out.add_(F.linear(F.linear(x[rows].to(a.dtype), a), b).to(out.dtype))
            else:
                delta = F.linear(F.linear(x.index_select(0, rows).to(a.dtype), a), b)
                out_rows.index_add_(0, rows, delta.to(output.dtype))
        return output

    def _weights(self, layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B x scaling) of `adapter` in `layer`, or None where it does not adapt the layer;
        B is scaled once here rather than the delta on every call."""
        key = (id(layer), adapter)
        if key not in self._cache:
            if adapter in layer.lora_A:
                a = layer.lora_A[adapter].weight
                b = layer.lora_B[adapter].weight * layer.scaling[adapter]
                self._cache[key] = (a, b)
            else:
                self._cache[key] = None
        return self._cache[key]


def adapter_tokenizer(
    entry: str, adapter: str, fallback: PreTrainedTokenizerBase
) -> PreTrainedTokenizerBase:
    """The adapter's own tokenizer when it ships one (added tokens, chat template), else its
    model's."""
    if not (Path(adapter).expanduser() / "tokenizer_config.json").is_file():
        return fallback
    try:
        return AutoTokenizer.from_pretrained(adapter)
    except Exception as exc:  # noqa: BLE001 - any failure becomes one line naming the entry
        raise load_failure(entry, f"the tokenizer of adapter {adapter!r}", exc) from exc


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
