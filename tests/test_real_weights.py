"""Real checkpoints: SmolLM2-135M-Instruct and gemma-3-270m, both as GGUF files.

Deselected by default (loading and dequantising them takes minutes on a small CPU). Run:

    python tests/fetch_weights.py
    python -m pytest -m real_weights tests/test_real_weights.py

SmolLM2 goes through what a user runs (`eft-serve --model FILE.gguf`, the `openai` client), and
as a family the way the README writes one (base and reference `plain`, the chat expert on its
own template, the README's defaults), which must answer as the chat model alone does;
gemma-3-270m is loaded in process, served by the engine with a prompt longer than its 512-token
sliding window, and compared with plain `transformers` greedy generation on the same module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fetch_weights import GEMMA3, SMOLLM2, cache_dir  # tests/ is on sys.path under pytest

# Loading and dequantising a GGUF file takes minutes on a small, shared CPU.
pytestmark = [pytest.mark.real_weights, pytest.mark.timeout(1800)]


def checkpoint(name: str) -> Path:
    path = cache_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: run `python tests/fetch_weights.py` first")
    return path


def test_smollm2_alone_answers_through_chat(tmp_path):
    import openai

    from server.process import ServerProcess

    gguf = checkpoint(SMOLLM2)
    server = ServerProcess(gguf, "--threads", "2", log_path=tmp_path / "server.log",
                           ready_timeout=600)  # fmt: skip
    server.cmd[server.cmd.index("--config")] = "--model"
    with server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=300)  # fmt: skip
        (model,) = [m.id for m in client.models.list()][:1]
        assert model == "SmolLM2-135M-Instruct.Q4_1"
        out = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
    answer = out.choices[0].message.content
    assert "Paris" in answer, answer
    assert "the API is open" in server.output()  # no --api-key: one warning line


@pytest.mark.anyio
async def test_gemma3_alone_past_its_sliding_window_matches_transformers(serve_app):
    import torch

    from decoding.engine import EngineConfig
    from decoding.family import FamilyConfig, load_family
    from server.app import ServerSettings

    family = load_family(FamilyConfig.single(str(checkpoint(GEMMA3))))
    (model,) = family.models.values()
    window = model.module.config.sliding_window
    assert window == 512
    text = " ".join(f"Item {i}: the {i}th river flows north past the salt town." for i in range(60))
    prompt = family.tokenizer.encode(text + " Item 60:", add_special_tokens=True)
    assert len(prompt) > window + 100
    with torch.no_grad():
        expected = model.module.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, top_k=None, top_p=None
        )[0, len(prompt) :].tolist()
    async with serve_app(family, EngineConfig(max_batch_size=2), ServerSettings()) as s:
        body = {"model": family.name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        r = await s.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["text"]
    assert got == family.tokenizer.decode(expected, skip_special_tokens=True)


# The family the README recommends, over the one real chat checkpoint: base and reference are the
# same weights under the same rendering, so the composition equals the chat model, and only the
# conservative filter (from the plain-rendered base) can move it.
SMOL_FAMILY = """\
name: smol
models:
  base:  {{path: {gguf}, chat_template: {plain}}}
  small: {{path: {gguf}, chat_template: {plain}}}
  chat:  {{path: {gguf}}}
base: base
reference: small
experts: [chat]
defaults: {defaults}
"""
COUNTRIES = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Egypt": "Cairo",
             "Spain": "Madrid", "Russia": "Moscow"}  # fmt: skip


README_DEFAULTS = "{chat: 1.0, plausibility: 0.3}"  # README "Serve your own models"


def _smol_family(tmp_path: Path, plain: str = "plain", defaults: str = README_DEFAULTS) -> Path:
    path = tmp_path / "family.yaml"
    path.write_text(SMOL_FAMILY.format(gguf=checkpoint(SMOLLM2), plain=plain, defaults=defaults))
    return path


@pytest.mark.parametrize("defaults", [README_DEFAULTS, "{chat: 1.0, base_top_p: 0.9}"])
def test_smollm2_family_with_the_readme_defaults_answers_as_the_chat_model_alone(
    tmp_path, defaults
):
    import openai

    from server.process import ServerProcess

    server = ServerProcess(_smol_family(tmp_path, defaults=defaults), "--threads", "2",
                           log_path=tmp_path / "server.log", ready_timeout=600)  # fmt: skip
    with server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                               timeout=300)  # fmt: skip
        tok_ids = {}
        for country, capital in COUNTRIES.items():
            answers = {}
            for model in ("smol", "smol/chat"):  # the family's defaults; the chat model alone
                out = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
                    max_tokens=16, temperature=0, logprobs=True,
                )  # fmt: skip
                answers[model] = out.choices[0]
                tok_ids[model] = out.choices[0].logprobs.content[0].token
            family, alone = (answers[m].message.content for m in ("smol", "smol/chat"))
            assert tok_ids["smol"] == tok_ids["smol/chat"], (family, alone)
            assert not family.startswith(" "), family
            if capital in alone:
                assert capital in family, (family, alone)
        log = server.output()
    assert "answer boundary aligned" in log, log[-2000:]


def test_smollm2_family_whose_base_prompt_ends_unlike_the_chat_template_warns_at_startup(
    tmp_path,
):
    from server.process import ServerProcess

    # `User: …\nAssistant:` alone: the base prefers " The", the chat model "The".
    old_plain = ("\"{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\\n"
                 "{% endfor %}Assistant:\"")  # fmt: skip
    server = ServerProcess(_smol_family(tmp_path, old_plain), "--threads", "2",
                           log_path=tmp_path / "server.log", ready_timeout=600)  # fmt: skip
    with server:
        log = server.output()
    (line,) = [x for x in log.splitlines() if "answer boundary" in x]
    assert "WARNING" in line and "differs between models" in line
    assert "base ' The'" in line and "chat 'The'" in line and "chat_template: plain" in line
