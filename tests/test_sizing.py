"""The sizing table of docs/sizing.md is `python -m loadtest.sizing --readme`, and its figures hold.

The default tests build every model on the meta device (a few seconds, no weights). The
`real_weights` test compares the two real GGUF checkpoints' metadata and tensor shapes with the
published configs the module holds (run `python tests/fetch_weights.py` first).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fetch_weights import GEMMA3, SMOLLM2, cache_dir  # tests/ is on sys.path under pytest

from loadtest import sizing

# The block lives in docs/sizing.md (the README links to it); the flag keeps its old name.
README = Path(__file__).resolve().parents[1] / "docs" / "sizing.md"
BEGIN = "<!-- sizing: python -m loadtest.sizing --readme -->\n"
END = "<!-- /sizing -->"


def test_readme_sizing_block_is_the_modules_output():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "docs/sizing.md lost its sizing markers"
    block = text.split(BEGIN)[1].split(END)[0]
    assert block.strip("\n") == sizing.readme_block().strip("\n"), (
        "regenerate with `python -m loadtest.sizing --readme`"
    )


def test_counts_a_tied_embedding_once_and_kv_over_every_layer():
    # SmolLM2-135M by hand: tied 49152 x 576 embedding, 30 layers of attention (q, o: 576 x 576;
    # k, v: 576 x 192), SwiGLU MLP (3 x 576 x 1536) and two norms, and the final norm.
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    s = sizing.size("HuggingFaceTB/SmolLM2-135M")
    assert s.params == 49152 * 576 + 30 * layer + 576
    assert s.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2 == s.full_kv_bytes_per_token
    assert sizing.size("HuggingFaceTB/SmolLM2-135M", "float32").weight_bytes == 4 * s.params


def test_sliding_window_layers_are_sized_like_full_ones():
    s = sizing.size("google/gemma-3-270m")
    assert s.windows == ((512,) * 5 + (None,)) * 3  # what eft-serve's runner reads from it
    assert s.kv_bytes_per_token == 18 * 2 * 256 * 2  # every layer keeps every token
    assert s.full_kv_bytes_per_token == 3 * 2 * 256 * 2


def test_cli_sizes_the_named_models_in_the_asked_dtype(capsys):
    sizing.main(["--model", "smollm2-135m", "--model", "Qwen/Qwen2.5-0.5B", "--dtype", "float32"])
    lines = capsys.readouterr().out.splitlines()
    assert "fp32 weights" in lines[0]
    assert lines[2].startswith("| SmolLM2-135M(-Instruct) | 0.135B | 0.538 GB | 30 × 3 × 64 |")
    assert lines[3].startswith("| Qwen2.5-0.5B(-Instruct) | 0.494B |")
    with pytest.raises(SystemExit, match="unknown model 'llama-9b'"):
        sizing.main(["--model", "llama-9b"])


def _gguf(name: str):
    gguf = pytest.importorskip("gguf")
    path = cache_dir() / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: run `python tests/fetch_weights.py` first")
    return gguf.GGUFReader(path)


@pytest.mark.real_weights
@pytest.mark.parametrize(
    "file, hub_id",
    [(SMOLLM2, "HuggingFaceTB/SmolLM2-135M"), (GEMMA3, "google/gemma-3-270m")],
)
def test_published_config_matches_the_real_gguf(file, hub_id):
    reader = _gguf(file)  # parsing the vocabulary takes ~30 s on a small CPU
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    arch = meta["general.architecture"]
    config = sizing.CONFIGS[hub_id]
    assert meta[f"{arch}.embedding_length"] == config["hidden_size"]
    assert meta[f"{arch}.feed_forward_length"] == config["intermediate_size"]
    assert meta[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert meta[f"{arch}.attention.head_count"] == config["num_attention_heads"]
    assert meta[f"{arch}.attention.head_count_kv"] == config["num_key_value_heads"]
    head_dim = meta.get(
        f"{arch}.attention.key_length", config["hidden_size"] // config["num_attention_heads"]
    )
    assert head_dim == config["head_dim"]
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    if "sliding_window" in config:
        assert meta[f"{arch}.attention.sliding_window"] == config["sliding_window"]
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: the output projection is the embedding
    assert sizing.size(hub_id).params == sum(math.prod(map(int, t.shape)) for t in reader.tensors)
