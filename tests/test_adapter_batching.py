"""LoRA adapters over one model run with that model as one forward per step, and compute what
separate merged models compute; an adapter that is not plain LoRA (DoRA) runs alone."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import load_family
from decoding.request import GenerationRequest, SamplingParams

KNOBS = [{"a": 1.0}, {"a": 0.6, "b": 0.4}, {"b": 1.5}, {"d": 1.0}, {"a": 0.0, "b": 0.0}]
PROMPTS = ["the river city", "a king of salt and copper was founded", "north", "the grain",
           "south"]  # fmt: skip


def lora(small_dir: Path, out: Path, seed: int, targets: list[str] | str, dora=False) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(small_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        use_dora=dora)  # fmt: skip
    get_peft_model(model, config).save_pretrained(out)
    return out


def merged(small_dir: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into a full copy of the model: what a user would serve without
    adapter entries."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_dir), adapter)
    model.merge_and_unload().save_pretrained(out)
    for f in small_dir.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def families(tiny_family_path, tmp_path_factory) -> tuple[Path, Path]:
    root = tiny_family_path.parent
    small = root / "small-base"
    tmp = tmp_path_factory.mktemp("adapters")
    a = lora(small, tmp / "a", 1, ["q_proj", "v_proj"])
    b = lora(small, tmp / "b", 2, ["q_proj", "k_proj", "o_proj", "down_proj"])
    d = lora(small, tmp / "d", 3, ["q_proj", "v_proj"], dora=True)
    common = {"large-base": {"path": str(root / "large-base")}, "small-base": {"path": str(small)}}
    config = {"base": "large-base", "reference": "small-base", "experts": ["a", "b", "d"]}
    adapted = {**common, **{n: {"adapter": str(p), "of": "small-base"}
                            for n, p in (("a", a), ("b", b), ("d", d))}}  # fmt: skip
    full = {**common, **{n: {"path": str(merged(small, p, tmp / f"{n}-merged"))}
                         for n, p in (("a", a), ("b", b), ("d", d))}}  # fmt: skip
    paths = []
    for name, models in (("adapted", adapted), ("merged", full)):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "models": models, **config}))
        paths.append(path)
    return paths[0], paths[1]


def run(family, speculative: str = "off", knobs: list[dict] = KNOBS):
    """Every (prompt, knobs) pair at once, greedy with log-probs; also counts each weight
    set's forwards, in all and in each step."""
    calls: dict[str, int] = {}
    per_step: list[dict[str, int]] = []
    drafted = []

    def on_step(s) -> None:
        drafted.append(s.spec_draft_tokens)
        per_step.append(dict(calls))
        calls.clear()

    engine = Engine(family, EngineConfig(max_batch_size=16, speculative=speculative),
                    on_step=on_step)  # fmt: skip
    for runner in {id(r): r for r in engine.runners.values()}.values():
        runner.module.register_forward_pre_hook(
            lambda *_, n=runner.name: calls.__setitem__(n, calls.get(n, 0) + 1)
        )

    async def one(i: int, text: str, knobs: dict) -> tuple[list[int], list[float]]:
        ids = family.tokenizer.encode(text)
        # The request with no expert cannot speculate: it ends early, so the others can.
        length = 10 if any(knobs.values()) else 3
        params = SamplingParams(max_tokens=length, temperature=0, logprobs=0, ignore_eos=True)
        req = GenerationRequest(f"r{i}", {m: ids for m in family.models},
                                make_composition(family, None, knobs), params)  # fmt: skip
        tokens, lps = [], []
        async for ev in engine.submit(req):
            tokens += ev.token_ids
            lps += [lp.logprob for lp in ev.logprobs or []]
        return tokens, lps

    async def go():
        engine.start()
        try:
            jobs = [one(i, p, k) for i, (p, k) in enumerate(zip(PROMPTS, knobs))]
            return await asyncio.gather(*jobs)
        finally:
            await engine.shutdown()

    outputs = asyncio.run(go())
    assert (sum(drafted) > 0) == (speculative != "off")
    return outputs, per_step, engine


def test_a_model_and_its_adapters_share_one_runner_and_one_forward_per_step(
    families, one_torch_thread
):
    family = load_family(families[0])
    _, per_step, engine = run(family)
    runners = engine.runners
    assert runners["small-base"] is runners["a"] is runners["b"]
    assert runners["large-base"] is not runners["a"]
    assert runners["d"] is not runners["a"], "a DoRA adapter runs alone, through PEFT's forward"
    # The reference and both adapters run together: never more forwards in a step than the
    # large base, which every request uses and which runs once per prefill and once per decode.
    assert all(step.get("small-base", 0) <= step.get("large-base", 0) for step in per_step)
    assert sum(step.get("small-base", 0) for step in per_step) >= 10


@pytest.mark.parametrize("speculative", ["off", "3"])
def test_batched_adapters_compute_what_separate_merged_models_compute(
    families, speculative, one_torch_thread
):
    adapted, _, _ = run(load_family(families[0]), speculative)
    full, per_step, _ = run(load_family(families[1]), "off")
    assert max(len(step) for step in per_step) == 5  # the merged family: five forwards a step
    for (tok_a, lp_a), (tok_m, lp_m) in zip(adapted, full):
        assert tok_a == tok_m
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_m), atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text", "phi3"])
def test_batched_adapters_match_merged_models_on_other_architectures(
    model_type, tmp_path, one_torch_thread
):
    # GPT-2's Conv1D projections, Gemma-3's hybrid sliding window, Phi-3's fused qkv/gate_up.
    from test_architectures import build_family

    from demo.random_family import sample_text, train_tokenizer

    tok = train_tokenizer(sample_text(seed=5), vocab_size=320)
    root = Path(build_family(tmp_path, model_type, tok)).parent
    small = root / "small-base"
    config = yaml.safe_load((root / "family.yaml").read_text())
    adapted, full = dict(config["models"]), dict(config["models"])
    for i, name in enumerate(("a", "b")):
        path = lora(small, tmp_path / name, 10 + i, "all-linear")
        adapted[name] = {"adapter": str(path), "of": "small-base"}
        full[name] = {"path": str(merged(small, path, tmp_path / f"{name}-merged"))}
    outputs = []
    for name, models in (("adapted", adapted), ("merged", full)):
        body = {**config, "name": name, "models": models, "experts": ["helpful", "a", "b"]}
        (root / f"{name}.yaml").write_text(yaml.safe_dump(body))
        knobs = [*KNOBS[:3], {"helpful": 1.0, "b": 0.5}, KNOBS[4]]
        outputs.append(run(load_family(root / f"{name}.yaml"), knobs=knobs)[0])
    for (tok_a, lp_a), (tok_m, lp_m) in zip(*outputs):
        assert tok_a == tok_m
        torch.testing.assert_close(torch.tensor(lp_a), torch.tensor(lp_m), atol=1e-4, rtol=0)
