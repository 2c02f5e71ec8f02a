"""Random-weight Llama families: the tiny ones the tests build, the perf family the bench builds.

A family here is what `decoding.family` loads from disk: one directory per model saved with
`save_pretrained` (safetensors + the shared tokenizer) and a `family.yaml` beside them. The
tokenizer is a byte-level BPE trained offline with `tokenizers` on a small generated text, with a
chat template, so chat requests go through the same code path as real checkpoints.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]

# A minimal chat template: the same markup the demo corpus uses.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }}</s>\n"
    "{% else %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a of and to in is was for on with as by at from that this it be are or an which "
    "river city north south king queen year founded capital export grain salt copper wool "
    "question answer help safe please thanks sorry cannot tell you me how what who when where "
    "élan naïve café über smörgåsbord 東京 数据 😀 🚀"
).split()


def sample_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-text with multi-byte characters, enough to train a small BPE."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n_lines)]


def train_tokenizer(texts: list[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def llama_config(
    tokenizer: PreTrainedTokenizerFast,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    vocab_pad: int = 0,
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer) + vocab_pad,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def perturbed_copy(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A copy of `model` with Gaussian noise on every weight: a stand-in for a fine-tune."""
    gen = torch.Generator().manual_seed(seed)
    clone = LlamaForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp_min(1e-3))
    return clone


def build_random_family(
    out_dir: str | Path,
    name: str = "tiny",
    large: dict | None = None,
    small: dict | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    vocab_size: int = 384,
    large_vocab_pad: int = 0,
    max_positions: int = 512,
    seed: int = 0,
    defaults: dict[str, float] | None = None,
    init_std: float = 0.2,
) -> Path:
    """Write a four-model family (large-base, small-base, helpful, harmless) and its YAML.

    `large`/`small` are `llama_config` keyword sets (hidden, layers, heads, ...). The experts are
    perturbed copies of small-base, so their log-prob deltas are small but not zero, as for a
    real fine-tune. `large_vocab_pad` pads the large model's embedding matrix beyond the
    tokenizer, as some real families do. `init_std` is larger than the usual 0.02 so random
    models have peaked, distinguishable next-token distributions. Returns the YAML's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or train_tokenizer(sample_text(seed=seed), vocab_size=vocab_size)
    large = large or {"hidden": 64, "layers": 3, "heads": 4, "kv_heads": 2}
    small = small or {"hidden": 32, "layers": 2, "heads": 2}

    def make(cfg: dict, pad: int, s: int) -> LlamaForCausalLM:
        torch.manual_seed(s)
        config = llama_config(tok, max_positions=max_positions, vocab_pad=pad, **cfg)
        config.initializer_range = init_std
        return LlamaForCausalLM(config).eval()

    models_ = {
        "large-base": make(large, large_vocab_pad, seed + 1),
        "small-base": make(small, 0, seed + 2),
    }
    models_["helpful"] = perturbed_copy(models_["small-base"], 0.3, seed + 3)
    models_["harmless"] = perturbed_copy(models_["small-base"], 0.3, seed + 4)
    for model_name, model in models_.items():
        _save(model, tok, out / model_name)
    config = {
        "name": name,
        "models": {m: {"path": m} for m in models_},
        "base": "large-base",
        "reference": "small-base",
        "experts": ["helpful", "harmless"],
        "defaults": defaults or {"helpful": 1.0, "harmless": 0.0},
    }
    path = out / "family.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
