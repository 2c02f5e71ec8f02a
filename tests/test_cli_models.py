"""`eft-serve --model`, `--max-model-len` and the API-key safety checks."""

from __future__ import annotations

import httpx
import openai
import pytest

from server import cli
from server.process import ServerProcess


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_a_startup_error(key, capsys):
    assert cli.main(["--api-key", key]) == 2
    assert "--api-key (or EFT_API_KEY) is set but empty" in capsys.readouterr().err


def test_an_empty_api_key_variable_is_a_startup_error(monkeypatch, capsys):
    monkeypatch.setenv("EFT_API_KEY", "")
    assert cli.main([]) == 2
    assert "set but empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--model", "m", "--config", "f.yaml"], ["--gguf-file", "m.gguf"],
             ["--served-model-name", "x"]],
)  # fmt: skip
def test_model_flags_go_together(argv, capsys):
    assert cli.main(argv) == 2
    assert "--model serves one model instead of --config" in capsys.readouterr().err


def test_max_model_len_beyond_the_models_context_exits_2(tiny_family_path, capsys):
    argv = ["--model", str(tiny_family_path.parent / "small-base"), "--max-model-len", "4096"]
    assert cli.main(argv) == 2
    assert "max_model_len 4096 exceeds the family's context limit 512" in capsys.readouterr().err


@pytest.fixture(scope="module")
def single(tiny_family_path, tmp_path_factory):
    """`eft-serve --model DIR --max-model-len 64` without an API key, on a loopback port."""
    server = ServerProcess(
        tiny_family_path.parent / "helpful", "--max-model-len", "64", "--threads", "1",
        "--served-model-name", "solo", log_path=tmp_path_factory.mktemp("solo") / "server.log",
        ready_timeout=120,
    )  # fmt: skip
    server.cmd[server.cmd.index("--config")] = "--model"
    with server:
        yield server


def test_model_alone_serves_the_openai_api(single):
    client = openai.OpenAI(base_url=f"{single.url}/v1", api_key="none", max_retries=0, timeout=60)
    models = client.models.list().data
    assert models[0].id == "solo"
    out = client.chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "who founded the city?"}],
        max_tokens=4, temperature=0,
    )  # fmt: skip
    assert out.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="solo", prompt="river", max_tokens=4,
                                  extra_body={"eft": {"helpful": 1}})  # fmt: skip
    assert err.value.body["param"] == "eft.helpful"
    # as vLLM, the model also answers to the path it was started with
    path = single.cmd[single.cmd.index("--model") + 1]
    assert client.completions.create(model=path, prompt="river", max_tokens=2).model


def test_model_alone_is_listed_and_named_by_one_id(single):
    # As vLLM lists one id per model: `solo`, not also the family's per-model id `solo/solo`.
    client = openai.OpenAI(base_url=f"{single.url}/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["solo"]
    assert client.models.retrieve("solo").id == "solo"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("solo/solo")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="solo/solo", prompt="river", max_tokens=2)
    assert err.value.body["param"] == "model"
    assert "Available models: solo." in err.value.body["message"]


def test_max_model_len_is_the_context_limit(single):
    card = httpx.get(f"{single.url}/v1/models", timeout=10).json()["data"][0]
    assert card["max_model_len"] == 64
    r = httpx.post(f"{single.url}/v1/completions", timeout=30,
                   json={"model": "solo", "prompt": "river", "max_tokens": 100})  # fmt: skip
    assert r.status_code == 400
    assert "maximum context length is 64" in r.json()["error"]["message"]


def test_no_api_key_logs_one_warning_that_the_api_is_open(single):
    lines = [ln for ln in single.output().splitlines() if "the API is open" in ln]
    assert len(lines) == 1 and "WARNING" in lines[0]
