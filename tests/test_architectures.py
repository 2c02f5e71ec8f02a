"""Every attention kind transformers ships for causal LMs, served end to end.

For each architecture a tiny random family (large base, small base, one expert) shares the
test tokenizer; where the architecture has a sliding window it is 8 tokens (hybrid layouts
for Gemma-2/3 and Qwen2's `max_window_layers`), and prompts plus outputs cross it. Three
completions with different lengths and knobs go through the HTTP server concurrently, one of
them joining while the others decode, with a step budget small enough to chunk the prompts.
Greedy tokens and log-probs must equal an independent full-sequence EFT computation (plain
`model(ids)` forwards, transformers' own masks, no cache) to 1e-4.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from decoding.engine import EngineConfig
from decoding.family import load_family
from decoding.runner import UnsupportedModelError, attention_windows
from demo.random_family import sample_text, train_tokenizer
from server.app import ServerSettings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

WINDOW = 8
# Architecture -> config keywords beyond the common ones (sizes, vocabulary, special ids).
ARCHITECTURES = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "mixtral": {"sliding_window": WINDOW, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "qwen3": {},
    "gemma2": {"sliding_window": WINDOW, "head_dim": 8},
    "gemma3_text": {"sliding_window": WINDOW, "head_dim": 8, "sliding_window_pattern": 2},
    "olmo2": {},
    "phi3": {"sliding_window": WINDOW},
    "gpt_neox": {},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "gpt2": {},
    "opt": {"word_embed_proj_dim": 32},
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(sample_text(seed=5), vocab_size=320)


def tiny_model(model_type: str, tok, layers: int, seed: int):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=32, n_embd=32,
        intermediate_size=64, ffn_dim=64,
        num_hidden_layers=layers, n_layer=layers,
        num_attention_heads=4, n_head=4,
        num_key_value_heads=2,
        max_position_embeddings=256, n_positions=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.2,
        **ARCHITECTURES[model_type],
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def build_family(root, model_type: str, tok) -> str:
    models = {"large-base": tiny_model(model_type, tok, 3, 1)}
    small = tiny_model(model_type, tok, 2, 2)
    expert = tiny_model(model_type, tok, 2, 2)
    with torch.no_grad():  # a "fine-tune": the small base plus noise
        gen = torch.Generator().manual_seed(3)
        for p in expert.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std().clamp_min(1e-3))
    models |= {"small-base": small, "helpful": expert}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    config = {
        "name": f"tiny-{model_type}",
        "models": {name: {"path": name} for name in models},
        "base": "large-base",
        "reference": "small-base",
        "experts": ["helpful"],
        "defaults": {"helpful": 1.0},
    }
    path = root / "family.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@torch.inference_mode()
def reference_greedy(family, coeffs: dict[str, float], ids: list[int], steps: int):
    """Greedy EFT decoding by full-sequence forwards: tokens and their composed log-probs."""
    ids, lps = list(ids), []
    for _ in range(steps):
        total = 0
        for name, c in coeffs.items():
            logits = family.models[name].module(torch.tensor([ids])).logits[0, -1]
            total = total + c * torch.log_softmax(
                logits[: family.vocab_size].float(), -1
            ).clamp_min(-1e4)
        composed = torch.log_softmax(total, -1)
        tok = int(composed.argmax())
        ids.append(tok)
        lps.append(float(composed[tok]))
    return ids[-steps:], lps


async def completion(client, family, prompt: str, knobs: dict, max_tokens: int) -> dict:
    body = {"model": family.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 0, "ignore_eos": True, "eft": knobs}  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize(
    "speculative,graphs", [("off", "off"), ("3", "off"), ("off", "on")],
    ids=["plain", "speculative", "graph-buffers"],
)  # fmt: skip
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
async def test_served_greedy_eft_equals_full_sequence_computation(
    model_type, speculative, graphs, tokenizer, tmp_path, serve_app
):
    """Plain decoding, speculation forced on (blocks of up to 3 verified by multi-token
    forwards that cross the sliding window), and decode through the CUDA-graph buffers (run
    without capture on this CPU: padded buckets, tables as wide as the context), against
    full-sequence forwards."""
    family = load_family(build_family(tmp_path, model_type, tokenizer))
    windows = attention_windows(family.models["large-base"].module)
    if "sliding_window" in ARCHITECTURES[model_type]:
        assert WINDOW in windows
    prompts = [
        ("the river city was founded by a king of salt and copper", {"helpful": 1.0}, 14),
        ("north", {"helpful": 0.5}, 16),
        ("a queen of wool and grain from the south", {"helpful": 2.0}, 10),
    ]
    cfg = EngineConfig(
        max_batch_size=4, max_num_batched_tokens=6, speculative=speculative, cuda_graphs=graphs
    )
    async with serve_app(family, cfg, ServerSettings()) as s:
        on = [r.graphs is not None for r, _ in s.engine.groups]
        assert all(on) if graphs == "on" else not any(on)
        first = [asyncio.create_task(completion(s.client, family, *p)) for p in prompts[:2]]
        while s.engine.scheduler.running == []:  # join the third while the others decode
            await asyncio.sleep(0.005)
        late = await completion(s.client, family, *prompts[2])
        choices = [*(await asyncio.gather(*first)), late]
        metrics = (await s.client.get("/metrics")).text
    drafted = re.search(r"^eft_spec_decode_draft_tokens_total (\S+)$", metrics, re.M)
    assert (float(drafted.group(1)) > 0) == (speculative != "off")
    for (prompt, knobs, max_tokens), choice in zip(prompts, choices):
        ids = tokenizer.encode(prompt)
        assert len(ids) + max_tokens > WINDOW
        coeffs = {"large-base": 1.0, "helpful": knobs["helpful"], "small-base": -knobs["helpful"]}
        want_ids, want_lps = reference_greedy(family, coeffs, ids, max_tokens)
        # (an incomplete UTF-8 sequence at the very end is never emitted)
        want_text = tokenizer.decode(want_ids, skip_special_tokens=True).rstrip("\ufffd")
        assert choice["text"].rstrip("\ufffd") == want_text
        got = torch.tensor(choice["logprobs"]["token_logprobs"])
        torch.testing.assert_close(got, torch.tensor(want_lps), atol=1e-4, rtol=0)


def test_models_without_a_kv_cache_are_refused(tokenizer):
    config = AutoConfig.for_model("mamba", vocab_size=len(tokenizer), hidden_size=16,
                                  num_hidden_layers=1, state_size=4)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    # Our own words, whichever way the installed transformers describes Mamba's layers.
    with pytest.raises(UnsupportedModelError, match="recurrent"):
        attention_windows(model)
