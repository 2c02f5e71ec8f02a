"""The shipped demo family (demo/family/) loads and serves a chat completion over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from demo.eval import format_ok

FAMILY = Path(__file__).resolve().parents[1] / "demo" / "family" / "family.yaml"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not FAMILY.is_file(), reason="demo family not built (python -m demo.build)"),
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def demo_api():
    from decoding.engine import Engine, EngineConfig
    from decoding.family import load_family
    from server.app import ServerSettings, create_app

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is fastest
    family = load_family(FAMILY)
    engine = Engine(family, EngineConfig(max_batch_size=8, max_waiting=8))
    engine.start()
    await engine.warmup()
    app = create_app(engine, family, ServerSettings())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
        yield c, family
    await engine.shutdown()
    torch.set_num_threads(before)


def test_shipped_family_shape() -> None:
    from decoding.family import FamilyConfig

    cfg = FamilyConfig.from_yaml(FAMILY)
    assert cfg.name == "demo" and cfg.base == "large-base" and cfg.reference == "small-base"
    assert cfg.experts == ["helpful", "harmless"] and "large-helpful" in cfg.models
    sizes = {
        m: sum(f.stat().st_size for f in Path(spec.path).iterdir())
        for m, spec in cfg.models.items()
    }
    assert sum(sizes.values()) <= 60e6  # the budget for committed weights
    summary = json.loads((FAMILY.parent / "build_summary.json").read_text())
    params = {m: v["params"] for m, v in summary["models"].items()}
    assert params["large-base"] >= 8 * params["small-base"]


async def test_shipped_family_serves_a_chat_completion(demo_api) -> None:
    client, family = demo_api
    models = (await client.get("/v1/models")).json()["data"]
    assert models[0]["id"] == "demo"
    assert "demo/large-helpful" in [m["id"] for m in models]
    # A held-out realm: EFT up-scaling answers in the experts' one-sentence format, then EOS.
    question = json.loads((FAMILY.parent / "eval_set.json").read_text())["questions"][0]
    r = await client.post(
        "/v1/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": question["question"]}],
            "temperature": 0,
            "max_tokens": 40,
            "eft": {"helpful": 1.0, "harmless": 0.0},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    text = choice["message"]["content"]
    assert format_ok(text, question["attribute"], choice["finish_reason"]), text
    assert question["entity"] in text
    assert body["eft"]["helpful"] == 1.0
