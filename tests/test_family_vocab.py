"""Vocabulary compatibility with a real tokenizer: SmolLM2's, in its base and instruct variants.

SmolLM2-135M (base) and SmolLM2-135M-Instruct share one vocabulary but declare different special
tokens (base: bos = eos = `<|endoftext|>`, id 0; instruct: bos `<|im_start|>` 1, eos and pad
`<|im_end|>` 2, and a chat template). A family of the two must load, stop on either EOS, render
each model's prompt with its own conventions and serve chat through the engine. The tokenizer is
SmolLM2's (tests/data, Apache-2.0); the weights are tiny random ones, so this runs in seconds.
"""

from __future__ import annotations

import json
import lzma
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from decoding.engine import EngineConfig
from decoding.family import FamilyError, load_family
from server.app import ServerSettings

DATA = Path(__file__).parent / "data"
INSTRUCT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_tokenizer(variant: str, tokenizer_json: str | None = None) -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer with the special tokens its base or instruct checkpoint declares."""
    text = tokenizer_json or lzma.decompress((DATA / "smollm2-tokenizer.json.xz").read_bytes())
    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if variant == "base":
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    else:
        special = {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "pad_token": "<|im_end|>",
        }
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="<|endoftext|>", **special)
    if variant == "instruct":
        tok.chat_template = INSTRUCT_TEMPLATE
    return tok


def save_model(out: Path, tok: PreTrainedTokenizerFast, seed: int, pad: int = 0, eos=None) -> Path:
    """A tiny random Llama over `tok` (its embedding padded by `pad` rows), saved with `tok`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok) + pad, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id if eos is None else eos, tie_word_embeddings=False,
        initializer_range=0.5,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def smol_family(tmp_path_factory) -> Path:
    """large-base and small-base with the base tokenizer, helpful with the instruct one (its
    embedding padded, its generation config listing two EOS ids, as Llama-3 instruct does)."""
    root = tmp_path_factory.mktemp("smol")
    base_tok, inst_tok = smollm2_tokenizer("base"), smollm2_tokenizer("instruct")
    save_model(root / "large-base", base_tok, 1)
    save_model(root / "small-base", base_tok, 2)
    save_model(root / "helpful", inst_tok, 3, pad=64, eos=[2, 0])
    config = {
        "name": "smol",
        "models": {
            "large-base": {"path": "large-base", "chat_template": "plain"},
            "small-base": {"path": "small-base", "chat_template": "plain"},
            "helpful": {"path": "helpful"},
        },
        "base": "large-base",
        "reference": "small-base",
        "experts": ["helpful"],
        "defaults": {"helpful": 1.0},
    }
    (root / "family.yaml").write_text(yaml.safe_dump(config))
    return root / "family.yaml"


def test_base_and_instruct_special_tokens_load_as_one_family(smol_family):
    family = load_family(smol_family)
    assert family.vocab_size == 49152  # the instruct model's padded embedding is cut
    assert {0, 2} <= family.eos_token_ids  # <|endoftext|> and <|im_end|> both end generation
    assert family.models["large-base"].tokenizer.bos_token_id == 0
    assert family.models["helpful"].tokenizer.bos_token_id == 1


def test_each_model_renders_the_chat_its_own_way(smol_family):
    family = load_family(smol_family)
    prompts = family.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    tok = family.tokenizer
    assert tok.decode(prompts["large-base"]).startswith("User: What is the capital of France?")
    # `plain` ends as the instruct template does (a newline), so both start the answer alike.
    assert tok.decode(prompts["large-base"]).endswith("\nAssistant:\n")
    assert tok.decode(prompts["helpful"]) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_stop_token_ids_in_the_config_replace_the_eos_union(smol_family, tmp_path):
    raw = yaml.safe_load(smol_family.read_text())
    raw["stop_token_ids"] = [2]
    raw["models"] = {n: {**m, "path": str(smol_family.parent / m["path"])}
                     for n, m in raw["models"].items()}  # fmt: skip
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(raw))
    assert load_family(tmp_path / "f.yaml").eos_token_ids == {2}


def test_a_strict_prefix_vocabulary_is_cut_to_the_shared_part(smol_family, tmp_path):
    tok = smollm2_tokenizer("instruct")
    tok.add_tokens(["<|only-in-harmless|>"], special_tokens=True)
    save_model(tmp_path / "harmless", tok, 4)
    raw = yaml.safe_load(smol_family.read_text())
    raw["models"] = {n: {**m, "path": str(smol_family.parent / m["path"])}
                     for n, m in raw["models"].items()}  # fmt: skip
    raw["models"]["harmless"] = {"path": str(tmp_path / "harmless")}
    raw["experts"].append("harmless")
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(raw))
    family = load_family(tmp_path / "f.yaml")
    assert len(family.models["harmless"].tokenizer) == 49153
    assert family.vocab_size == 49152


def test_a_token_that_differs_is_refused_naming_both_models_and_the_token(smol_family, tmp_path):
    spec = json.loads(lzma.decompress((DATA / "smollm2-tokenizer.json.xz").read_bytes()))
    # id 3 is the special token <repo_name>; rename it in one checkpoint only
    for added in spec["added_tokens"]:
        if added["id"] == 3:
            old, added["content"] = added["content"], "<renamed>"
    spec["model"]["vocab"]["<renamed>"] = spec["model"]["vocab"].pop(old)
    save_model(tmp_path / "helpful", smollm2_tokenizer("instruct", json.dumps(spec)), 3)
    raw = yaml.safe_load(smol_family.read_text())
    raw["models"] = {n: {**m, "path": str(smol_family.parent / m["path"])}
                     for n, m in raw["models"].items()}  # fmt: skip
    raw["models"]["helpful"]["path"] = str(tmp_path / "helpful")
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(FamilyError) as err:
        load_family(tmp_path / "f.yaml")
    msg = str(err.value)
    assert "'large-base' and 'helpful'" in msg and "token id 3" in msg
    assert "'<repo_name>'" in msg and "'<renamed>'" in msg and "\n" not in msg


@pytest.mark.anyio
async def test_chat_through_the_engine_with_both_special_token_variants(
    smol_family, serve_app, one_torch_thread
):
    family = load_family(smol_family)
    async with serve_app(family, EngineConfig(max_batch_size=4), ServerSettings()) as s:
        body = {
            "model": "smol",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
            "eft": {"helpful": 0.5},
        }
        r = await s.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        prompts = family.render_chat(body["messages"])
        assert out["usage"]["prompt_tokens"] == max(len(p) for p in prompts.values())
        assert out["usage"]["completion_tokens"] >= 1
        assert out["eft"]["helpful"] == 0.5
        body = {k: v for k, v in body.items() if k != "eft"}
        r = await s.client.post("/v1/chat/completions", json={**body, "model": "smol/helpful"})
        assert r.status_code == 200, r.text
