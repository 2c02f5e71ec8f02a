"""What the OpenAI surface does not do, it says: tool calling is refused with a 400 naming the
parameter (not answered in plain text as if the model chose no tool), the version is one call
away (`eft-serve --version`, `GET /version`), and the startup log lists only ids that answer."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from importlib.metadata import version

import httpx
import pytest

from decoding.engine import EngineConfig
from server import cli
from server.app import ServerSettings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("one_torch_thread")]

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
FUNCTION = {"name": "f", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
async def srv(tiny_family, serve_app):
    settings = ServerSettings(api_key="k")  # /version stays open, like /health
    async with serve_app(tiny_family, EngineConfig(max_batch_size=4), settings) as s:
        s.client.headers["Authorization"] = "Bearer k"
        yield s


REFUSED = [
    ({"tools": [TOOL]}, "tools"),
    ({"tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [FUNCTION]}, "functions"),
    ({"functions": [FUNCTION], "function_call": "auto"}, "function_call"),
]  # fmt: skip


@pytest.mark.parametrize("extra,param", REFUSED, ids=[p for _, p in REFUSED])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_tool_calls_are_a_400_naming_the_parameter(srv, path, extra, param):
    body = {**CHAT, **extra}
    if path == "/v1/completions":
        body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": "hi"}
    r = await srv.client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "not supported" in err["message"]


ACCEPTED = [
    {"tools": [TOOL], "tool_choice": "none"},
    {"tool_choice": "none"},
    {"tools": []},
    {"tools": None, "tool_choice": None},
    {"functions": [FUNCTION], "function_call": "none"},
]


@pytest.mark.parametrize("extra", ACCEPTED, ids=[str(e) for e in ACCEPTED])
async def test_no_tool_call_asked_is_served(srv, extra):
    r = await srv.client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


async def test_version_endpoint_is_open_and_names_the_package_version(srv):
    r = await httpx.AsyncClient(transport=srv.client._transport, base_url="http://test").get(
        "/version"
    )  # no Authorization header
    assert r.status_code == 200
    assert r.json() == {"version": version("eft-serve")}
    schema = (await srv.client.get("/openapi.json")).json()
    assert "/version" in schema["paths"]


def test_cli_version_prints_the_package_version():
    proc = subprocess.run([sys.executable, "-m", "server.cli", "--version"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"eft-serve {version('eft-serve')}"


@pytest.mark.parametrize("single", [False, True], ids=["family", "one-model"])
def test_startup_log_lists_exactly_the_ids_that_answer(
    tiny_family_path, single, monkeypatch, caplog
):
    served = {}

    def fake_server_class(on_drain, on_force=None):
        class Server:
            started = True
            forced = False

            def __init__(self, config):
                self.app = config.app

            def run(self):
                served["ids"] = _served_ids(self.app)

        return Server

    monkeypatch.setattr(cli, "_server_class", fake_server_class)
    model_dir = tiny_family_path.parent / "helpful"
    argv = ["--model", str(model_dir)] if single else ["--config", str(tiny_family_path)]
    with caplog.at_level(logging.INFO):
        assert cli.main([*argv, "--threads", "1", "--device", "cpu"]) == 0
    line = next(r.getMessage() for r in caplog.records if "serving on" in r.getMessage())
    logged = re.search(r"\(models: ([^)]*)\)", line).group(1).split(", ")
    assert logged == served["ids"]
    if single:
        assert logged == ["helpful"]


def _served_ids(app) -> list[str]:
    import asyncio

    async def get():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            ids = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            for mid in ids:  # every listed id answers
                assert (await c.get(f"/v1/models/{mid}")).status_code == 200
            return ids

    return asyncio.run(get())
