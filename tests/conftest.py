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
