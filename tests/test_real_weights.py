"""Real checkpoints, served alone: SmolLM2-135M-Instruct and gemma-3-270m, both as GGUF files.

Deselected by default (loading and dequantising them takes minutes on a small CPU). Run:

    python tests/fetch_weights.py
    python -m pytest -m real_weights tests/test_real_weights.py

SmolLM2 goes through what a user runs (`eft-serve --model FILE.gguf`, the `openai` client);
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
