"""Memory per model and KV cache per token for the checkpoints the README sizes.

    python -m loadtest.sizing [--model NAME ...] [--dtype bfloat16|float32]

No model hub is needed: each model's architecture fields are written below as they appear in
its published `config.json`. Each is instantiated with transformers on the meta device (no
memory, no weights), its parameters are counted exactly (a tied embedding once), and its KV
bytes per token come from the layers `decoding.runner.attention_windows` finds, i.e. the cache
eft-serve uses. Its paged cache keeps one block table for all of a model's layers, so a hybrid
model's sliding-window layers hold every token too (their mask restricts what they see): KV per
token is the full figure for every layer.

Gemma-3-27B-pt is an image-text checkpoint: `AutoModelForCausalLM` loads it, and eft-serve
serves it, as `Gemma3ForConditionalGeneration` with its SigLIP vision tower, so its count
includes the tower (the footnote gives the text part alone).

The README's sizing table is this module's output (`tests/test_sizing.py` checks that):

    python -m loadtest.sizing --readme
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from decoding.runner import attention_windows

GIB, KIB = 1 << 30, 1 << 10

# Architecture fields of each published config.json (hub id -> fields). Rope scaling, norms'
# epsilon and token ids change neither the parameter count nor the cache, so they are left out.
# Qwen2.5's configs name no head_dim (it is hidden_size / heads = 128 or 64) and turn sliding
# windows off, which makes their `sliding_window` and `max_window_layers` moot.
_LLAMA3 = {"model_type": "llama", "vocab_size": 128256}
_QWEN25 = {"model_type": "qwen2", "use_sliding_window": False}
CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-3.1-70B": {
        **_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.1-8B": {
        **_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.2-3B": {
        **_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
        "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.2-1B": {
        **_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-72B": {
        **_QWEN25, "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen2.5-7B": {
        **_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen2.5-0.5B": {
        **_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "google/gemma-3-27b-pt": {
        "model_type": "gemma3", "mm_tokens_per_image": 256,
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504,
            "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
            "head_dim": 128, "vocab_size": 262208, "query_pre_attn_scalar": 168,
            "sliding_window": 1024, "sliding_window_pattern": 6,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 896,
            "patch_size": 14, "vision_use_head": False,
        },
    },
    "google/gemma-3-1b-pt": {
        "model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912,
        "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "vocab_size": 262144, "query_pre_attn_scalar": 256,
        "sliding_window": 512, "sliding_window_pattern": 6,
    },
    "google/gemma-3-270m": {
        "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "vocab_size": 262144, "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    },
    "HuggingFaceTB/SmolLM2-135M": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
    },
}  # fmt: skip

# How the README's table names each model (the checkpoints that share its architecture).
LABELS = {
    "meta-llama/Llama-3.1-70B": "Llama-3.1-70B",
    "meta-llama/Llama-3.1-8B": "Llama-3.1-8B",
    "meta-llama/Llama-3.2-3B": "Llama-3.2-3B(-Instruct)",
    "meta-llama/Llama-3.2-1B": "Llama-3.2-1B(-Instruct)",
    "Qwen/Qwen2.5-72B": "Qwen2.5-72B",
    "Qwen/Qwen2.5-7B": "Qwen2.5-7B",
    "Qwen/Qwen2.5-0.5B": "Qwen2.5-0.5B(-Instruct)",
    "google/gemma-3-27b-pt": "Gemma-3-27B-pt",
    "google/gemma-3-1b-pt": "Gemma-3-1B-pt/-it",
    "google/gemma-3-270m": "gemma-3-270m",
    "HuggingFaceTB/SmolLM2-135M": "SmolLM2-135M(-Instruct)",
}

# The README's worked example: the Llama family of its "Serve your own models" section.
EXAMPLE = ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"]
EXAMPLE_SEQUENCES, EXAMPLE_TOKENS = 32, 4096

DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
SHORT = {"bfloat16": "bf16", "float32": "fp32"}


def build_config(fields: dict) -> PretrainedConfig:
    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@dataclass(frozen=True)
class Sizing:
    """One model's weights and KV cache, per element size `nbytes` (2 for bf16)."""

    name: str
    params: int
    vision_params: int  # parameters of a vision tower (and its projector), 0 for text models
    windows: tuple[int | None, ...]  # each layer's attention window, None = full attention
    kv_heads: int
    head_dim: int
    nbytes: int

    @property
    def weight_bytes(self) -> int:
        return self.params * self.nbytes

    @property
    def layer_kv_bytes(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.nbytes

    @property
    def kv_bytes_per_token(self) -> int:
        """What eft-serve's cache holds per token: every layer, sliding ones included."""
        return len(self.windows) * self.layer_kv_bytes

    @property
    def sliding_layers(self) -> int:
        return sum(w is not None for w in self.windows)

    @property
    def full_kv_bytes_per_token(self) -> int:
        """Per token past the window, for a cache that kept only the window in sliding layers."""
        return (len(self.windows) - self.sliding_layers) * self.layer_kv_bytes


def size(name: str, dtype: str = "bfloat16") -> Sizing:
    """Instantiate `name`'s published architecture on the meta device and size it."""
    config = build_config(CONFIGS[name])
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(config)
    params = vision = 0
    for pname, p in module.named_parameters():  # a tied parameter is listed once
        params += p.numel()
        if "vision_tower" in pname or "multi_modal_projector" in pname:
            vision += p.numel()
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Sizing(name, params, vision, tuple(attention_windows(module)),
                  text.num_key_value_heads, head_dim, DTYPE_BYTES[dtype])  # fmt: skip


def _sig(x: float, digits: int = 3) -> str:
    """`x` (> 0) to `digits` significant figures, without an exponent."""
    x = float(f"{x:.{digits - 1}e}")  # round first: 0.9996 -> 1.00, not 1.000
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(x)))}f}"


def _kib(n: int) -> str:
    return f"{n / KIB:g} KiB"


def wrap(text: str, width: int = 100) -> str:
    """`text` as README lines. A `+` never starts a line (markdown would read a list item), and
    a figure stays on the line of its unit."""
    for glued in (" + ", " GB", " GiB", " KiB"):
        text = text.replace(glued, "\0" + glued[1:])
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)).replace("\0", " ")


def table(rows: list[Sizing], dtype: str = "bfloat16") -> str:
    """The README's markdown table, then a footnote for the sliding-window and image models."""
    short = SHORT[dtype]
    lines = [
        f"| model | parameters | {short} weights | layers × KV heads × head dim "
        f"| KV per token ({short}) |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for r in rows:
        mark = "*" if r.sliding_layers else ""
        dagger = "†" if r.vision_params else ""
        lines.append(
            f"| {LABELS[r.name]} | {_sig(r.params / 1e9)}B{dagger} | "
            f"{_sig(r.weight_bytes / 1e9)} GB | "
            f"{len(r.windows)} × {r.kv_heads} × {r.head_dim} | {_kib(r.kv_bytes_per_token)}{mark} |"
        )
    notes = []
    sliding = [r for r in rows if r.sliding_layers]
    if sliding:
        each = ", ".join(
            f"{LABELS[r.name]} {_kib(r.full_kv_bytes_per_token)} ({r.sliding_layers} of "
            f"{len(r.windows)} layers slide over {max(w for w in r.windows if w):,} tokens)"
            for r in sliding
        )
        notes.append(
            "\\* Gemma-3 is hybrid: eft-serve's paged cache keeps one block table for all of a "
            "model's layers, so its sliding-window layers hold every token too (their attention "
            "mask restricts them to the window), and this is what it uses. (A model whose every "
            "layer slides gives back the blocks behind its window.) A pool per layer kind would "
            f"need, per token beyond the window, only the full-attention layers' share: {each}."
        )
    for r in rows:
        if r.vision_params:
            notes.append(
                f"† With its {_sig(r.vision_params / 1e9)}B-parameter vision tower, which "
                f"transformers loads with this image-text checkpoint (the text part is "
                f"{_sig((r.params - r.vision_params) / 1e9)}B)."
            )
    return "\n\n".join(["\n".join(lines), *map(wrap, notes)]) + "\n"


def example(sizings: dict[str, Sizing]) -> str:
    """The README's worked example: the Llama family's weights and KV for a full batch (bf16)."""
    rows = [sizings[n] for n in EXAMPLE]
    weights = [r.weight_bytes / 1e9 for r in rows]
    kv = [r.kv_bytes_per_token for r in rows]
    batch = EXAMPLE_SEQUENCES * EXAMPLE_TOKENS * sum(kv)
    total = sum(weights) + batch / 1e9
    fits = "fits one 80 GB GPU" if total <= 80 else "needs more than one 80 GB GPU"
    return wrap(
        f"Example: the Llama family above holds {' + '.join(_sig(w) for w in weights)} = "
        f"{_sig(sum(weights))} GB of weights and {' + '.join(f'{k // KIB:g}' for k in kv)} = "
        f"{_kib(sum(kv))} of KV per token, so {EXAMPLE_SEQUENCES} sequences of "
        f"{EXAMPLE_TOKENS:,} tokens hold another {batch / GIB:g} GiB: {total:.0f} GB in all, "
        f"which {fits}. The KV cache is paged (blocks of 16 tokens): a sequence holds blocks "
        f"for its own tokens only, so `--kv-cache-memory {batch / GIB:g}GiB` serves those "
        f"{EXAMPLE_SEQUENCES} sequences or any other mix of the same number of tokens; on a GPU "
        f"the default pool is what `--gpu-memory-utilization` leaves after the weights "
        f"(`eft_kv_cache_bytes` reports the blocks in use, `eft_kv_cache_capacity_bytes` the "
        f"pool)."
    )


def readme_block() -> str:
    """The bf16 table, its footnotes and the worked example, as the README holds them."""
    sizings = {name: size(name) for name in CONFIGS}
    return table(list(sizings.values())) + "\n" + example(sizings) + "\n"


def select(names: list[str]) -> list[str]:
    """Hub ids for `names`, each a hub id or its last part, any case."""
    out = []
    for name in names:
        hits = [h for h in CONFIGS if name.lower() in (h.lower(), h.split("/")[1].lower())]
        if not hits:
            known = ", ".join(h.split("/")[1] for h in CONFIGS)
            raise SystemExit(f"python -m loadtest.sizing: unknown model {name!r}; known: {known}")
        out += hits
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.sizing",
        description="Print parameters, weight memory and KV-cache bytes per token of the models "
        "the README sizes, from their published architectures (instantiated on the meta device: "
        "no weights, no hub).",
    )
    p.add_argument(
        "--model", action="append", default=[], metavar="NAME",
        help="a model to size, as a hub id or its last part (meta-llama/Llama-3.1-8B or "
        "llama-3.1-8b); repeat for several. Default: every model the README sizes",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=list(DTYPE_BYTES), default="bfloat16",
        help="element type of weights and cache (default bfloat16, eft-serve's default on a "
        "GPU; float32 is its default on a CPU)",
    )  # fmt: skip
    p.add_argument(
        "--readme", action="store_true",
        help="print the README's block instead: the table of every model in bfloat16, its "
        "footnotes and the worked example (ignores --model and --dtype)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.readme:
        sys.stdout.write(readme_block())
        return
    names = select(args.model) if args.model else list(CONFIGS)
    print(table([size(n, args.dtype) for n in names], args.dtype))


if __name__ == "__main__":
    main()
