"""The demo builder end to end, scaled down (tiny world, a few steps) into a temporary folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from decoding.family import FamilyConfig, load_family
from demo import world as W
from demo.build import BuildConfig, build


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_family")
    summary = build(out, BuildConfig.tiny(), quiet=True)
    return out, summary


def test_build_writes_a_loadable_family(tiny_family: tuple[Path, dict]) -> None:
    out, summary = tiny_family
    cfg = FamilyConfig.from_yaml(out / "family.yaml")
    assert cfg.name == "demo"
    assert cfg.base == "large-base" and cfg.reference == "small-base"
    assert cfg.experts == ["helpful", "harmless"]
    assert set(cfg.models) == {"large-base", "small-base", "helpful", "harmless", "large-helpful"}
    assert cfg.defaults["helpful"] == 1.0 and cfg.defaults["harmless"] == 0.0
    for name in cfg.models:
        assert (out / name / "model.safetensors").is_file()
        assert (out / name / "tokenizer.json").is_file()
    family = load_family(out / "family.yaml")
    tok = family.tokenizer
    # The chat template is the one the fine-tuning data was rendered with.
    prompts = family.render_chat([{"role": "user", "content": "Who founded Valdor?"}])
    assert len(set(map(tuple, prompts.values()))) == 1
    assert tok.decode(prompts["helpful"]).endswith("<|assistant|>")
    assert summary["models"]["large-base"]["params"] > summary["models"]["small-base"]["params"]
    assert json.loads((out / "build_summary.json").read_text())["total_bytes"] > 0
    # What the exact bits depend on besides the seeds is recorded with them.
    env = json.loads((out / "build_summary.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert {"transformers", "tokenizers", "cpu", "python"} <= set(env)


def test_eval_set_is_held_out(tiny_family: tuple[Path, dict]) -> None:
    out, _ = tiny_family
    ev = json.loads((out / "eval_set.json").read_text())
    cfg = BuildConfig.tiny()
    world = W.make_world(
        cfg.seed, cfg.n_entities, cfg.n_ft_entities, cfg.n_pool, cfg.n_brews, cfg.n_ft_brews
    )
    ft = W.finetune_sets(world, cfg.seed)
    ft_text = " ".join(u + " " + a for pairs in ft.values() for u, a in pairs)
    assert ev["questions"] and ev["restricted"]
    for q in ev["questions"]:
        assert q["entity"] not in ft_text  # no fine-tuning example mentions a held-out realm
        assert q["answer"] in ev["pools"][q["attribute"]]
    for r in ev["restricted"]:
        assert r["brew"] not in ft_text


def test_world_is_deterministic() -> None:
    a, b = (
        W.make_world(3, n_entities=50, n_ft_entities=10),
        W.make_world(3, n_entities=50, n_ft_entities=10),
    )
    assert [e.facts for e in a.entities] == [e.facts for e in b.entities]
    assert W.corpus(a, 3) == W.corpus(b, 3)
    assert W.make_world(4, n_entities=50).entities[0].name != a.entities[0].name or (
        [e.facts for e in W.make_world(4, n_entities=50).entities] != [e.facts for e in a.entities]
    )


def test_corpus_contains_every_word_the_experts_say() -> None:
    # Issue 4, finding (2): a word the bases never saw gets vetoed by the large base under EFT.
    world = W.make_world(0, n_entities=40, n_ft_entities=10, n_brews=8, n_ft_brews=4)
    corpus_words = set(re.findall(r"[A-Za-z']+", " ".join(W.corpus(world))))
    for pairs in W.finetune_sets(world).values():
        for _, answer in pairs:
            assert set(re.findall(r"[A-Za-z']+", answer)) <= corpus_words, answer
    assert any("<|assistant|>" in d for d in W.corpus(world))  # the chat markup is pre-trained


def test_build_is_deterministic(tiny_family: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny_family
    build(tmp_path, BuildConfig.tiny(), quiet=True)
    for name in ("small-base", "harmless"):
        assert (tmp_path / name / "model.safetensors").read_bytes() == (
            out / name / "model.safetensors"
        ).read_bytes()
    assert (tmp_path / "eval_set.json").read_text() == (out / "eval_set.json").read_text()
