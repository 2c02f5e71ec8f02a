"""Shared fixtures: a tiny random-weight Llama family built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_configure(config):
    # Tests, their engine thread and the servers they start share 2 cores: one torch thread per
    # process avoids oversubscription (it is several times faster here than the default).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_family_path(tmp_path_factory):
    """YAML path of a 4-model family (large-base, small-base, helpful, harmless).

    The large model's embedding matrix is padded beyond the tokenizer, as in some real
    families, so every test also exercises the vocabulary cut.
    """
    from demo.random_family import build_random_family

    return build_random_family(tmp_path_factory.mktemp("tiny-family"), large_vocab_pad=7)


@pytest.fixture(scope="session")
def tiny_family(tiny_family_path):
    from decoding.family import load_family

    return load_family(tiny_family_path)


# ------------------------------------------------------------------ the in-process HTTP server


@pytest.fixture(scope="module")
def anyio_backend():
    # Module scope, so module-scoped async fixtures (one engine per module) can use it.
    return "asyncio"


@pytest.fixture(scope="module")
def one_torch_thread():
    # Tiny models on a shared CPU: one intra-op thread is several times faster than many.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def serve_app():
    """`async with serve_app(family, engine_config, settings) as s:` a started, warmed-up engine
    behind `create_app`, and an httpx client on it (in process); `s` has client, app, engine,
    family, metrics. The engine is shut down on exit."""
    from contextlib import asynccontextmanager
    from types import SimpleNamespace

    import httpx

    from decoding.engine import Engine
    from server.app import create_app
    from server.metrics import ServerMetrics

    @asynccontextmanager
    async def serve(family, engine_config, settings):
        metrics = ServerMetrics.for_family(family)
        engine = Engine(family, engine_config, on_step=metrics.on_step)
        engine.start()
        await engine.warmup()
        app = create_app(engine, family, settings, metrics=metrics)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     timeout=60) as client:
            yield SimpleNamespace(client=client, app=app, engine=engine, family=family,
                                  metrics=metrics)
        await engine.shutdown()

    return serve
