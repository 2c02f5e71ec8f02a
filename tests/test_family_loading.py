"""Families beyond the four-model demo: one model alone, shared weights, LoRA adapters, and the
one-line errors of a load that fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from decoding.engine import EngineConfig
from decoding.family import FamilyConfig, FamilyError, load_family
from server.app import ServerSettings


def write_yaml(path: Path, **raw) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def small_dir(tiny_family_path) -> Path:
    return tiny_family_path.parent / "small-base"


@pytest.fixture(scope="module")
def helpful_dir(tiny_family_path) -> Path:
    return tiny_family_path.parent / "helpful"


# ------------------------------------------------------------------ one model alone


@pytest.mark.anyio
async def test_a_single_model_family_serves_without_knobs(small_dir, serve_app, one_torch_thread):
    family = load_family(FamilyConfig.single(str(small_dir)))
    assert family.name == "small-base" and list(family.models) == ["small-base"]
    # serve_app runs Engine.warmup through every model of the family
    async with serve_app(family, EngineConfig(max_batch_size=4), ServerSettings()) as s:
        ids = [m["id"] for m in (await s.client.get("/v1/models")).json()["data"]]
        assert ids[0] == "small-base"
        body = {"model": "small-base", "prompt": "the river city", "max_tokens": 5,
                "temperature": 0}  # fmt: skip
        r = await s.client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        r = await s.client.post("/v1/completions", json={**body, "eft": {"helpful": 1}})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "eft.helpful"


def test_experts_without_a_reference_are_refused(small_dir, tmp_path):
    path = write_yaml(tmp_path / "f.yaml", name="x", models={"a": {"path": str(small_dir)},
                      "b": {"path": str(small_dir)}}, base="a", experts=["b"])  # fmt: skip
    with pytest.raises(FamilyError, match="reference"):
        load_family(path)


def test_max_model_len_caps_the_context_and_cannot_exceed_it(small_dir):
    config = FamilyConfig.single(str(small_dir))
    assert load_family(config, max_model_len=64).context_limit == 64
    with pytest.raises(FamilyError, match="exceeds the family's context limit 512"):
        load_family(config, max_model_len=100_000)


# ------------------------------------------------------------------ shared weights


@pytest.fixture(scope="module")
def twin_family(small_dir, helpful_dir, tmp_path_factory) -> Path:
    """The same small checkpoint as the base (plain prompts) and as the reference (its chat
    template): EFT with weight 1 is then exactly the expert alone."""
    return write_yaml(
        tmp_path_factory.mktemp("twin") / "family.yaml",
        name="twin",
        models={
            "base": {"path": str(small_dir), "chat_template": "plain"},
            "reference": {"path": str(small_dir)},
            "helpful": {"path": str(helpful_dir)},
        },
        base="base",
        reference="reference",
        experts=["helpful"],
    )


def test_entries_of_one_checkpoint_share_one_module(twin_family):
    family = load_family(twin_family)
    base, ref = family.models["base"], family.models["reference"]
    assert base.module is ref.module
    assert ref.shares_weights_with == "base" and base.shares_weights_with is None
    assert base.chat_template == "plain" and ref.chat_template == "tokenizer"
    assert family.models["helpful"].module is not base.module


def test_a_different_dtype_is_a_different_copy(small_dir, tmp_path):
    path = write_yaml(tmp_path / "f.yaml", name="x", models={
        "a": {"path": str(small_dir)}, "b": {"path": str(small_dir), "dtype": "bfloat16"}},
        base="a")  # fmt: skip
    family = load_family(path)
    assert family.models["a"].module is not family.models["b"].module


@pytest.mark.anyio
async def test_shared_weights_keep_separate_kv_state(twin_family, serve_app, one_torch_thread):
    # base + 1 * (helpful - reference) with base == reference is helpful alone: if the two
    # entries shared a KV cache, or a step of one disturbed the other, greedy outputs would part.
    family = load_family(twin_family)
    async with serve_app(family, EngineConfig(max_batch_size=8), ServerSettings()) as s:
        body = {"prompt": "the king of the north", "max_tokens": 12, "temperature": 0,
                "logprobs": 1, "ignore_eos": True}  # fmt: skip
        eft = await s.client.post(
            "/v1/completions", json={**body, "model": "twin", "eft": {"helpful": 1.0}}
        )
        alone = await s.client.post("/v1/completions", json={**body, "model": "twin/helpful"})
        assert eft.status_code == alone.status_code == 200
        a, b = eft.json()["choices"][0], alone.json()["choices"][0]
        assert a["text"] == b["text"]
        assert a["logprobs"]["token_logprobs"] == pytest.approx(
            b["logprobs"]["token_logprobs"], abs=1e-4
        )


# ------------------------------------------------------------------ LoRA adapters


@pytest.fixture(scope="module")
def lora_dir(small_dir, tmp_path_factory) -> Path:
    """A LoRA adapter over small-base with non-zero random weights (a trained one stand-in)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(small_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)  # fmt: skip
    out = tmp_path_factory.mktemp("lora")
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_family(small_dir, lora_dir, tmp_path_factory) -> Path:
    return write_yaml(
        tmp_path_factory.mktemp("adapted") / "family.yaml",
        name="adapted",
        models={
            "small-base": {"path": str(small_dir)},
            "tuned": {"adapter": str(lora_dir), "of": "small-base"},
        },  # fmt: skip
        base="small-base",
    )


def test_an_adapter_shares_its_models_weights(adapter_family):
    family = load_family(adapter_family)
    base, tuned = family.models["small-base"], family.models["tuned"]
    assert tuned.shares_weights_with == "small-base"
    base_params = {p.data_ptr() for p in base.module.parameters()}
    lora = [n for n, _ in tuned.module.named_parameters() if "lora_" in n]
    assert lora, "the adapter's LoRA layers are in its module"
    shared = [p for n, p in tuned.module.named_parameters() if "lora_" not in n]
    assert all(p.data_ptr() in base_params for p in shared)
    assert not any("lora_" in n for n, _ in base.module.named_parameters())


def test_an_adapter_computes_what_the_merged_model_computes(adapter_family, small_dir, lora_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    family = load_family(adapter_family)
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(small_dir), lora_dir
    ).merge_and_unload()
    ids = torch.tensor([family.tokenizer.encode("the river city of salt")])
    with torch.no_grad():
        tuned = family.models["tuned"].module(input_ids=ids).logits
        base = family.models["small-base"].module(input_ids=ids).logits
        expected = merged.eval()(input_ids=ids).logits
    assert torch.allclose(tuned, expected, atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-2)


@pytest.mark.anyio
async def test_an_adapter_entry_serves_through_the_engine(
    adapter_family, serve_app, one_torch_thread
):
    family = load_family(adapter_family)
    async with serve_app(family, EngineConfig(max_batch_size=4), ServerSettings()) as s:
        body = {"prompt": "the river city", "max_tokens": 6, "temperature": 0}
        r = await s.client.post("/v1/completions", json={**body, "model": "adapted/tuned"})
        assert r.status_code == 200, r.text


def test_adapter_entries_are_checked(small_dir, lora_dir, tmp_path):
    models = {"a": {"path": str(small_dir)}, "t": {"adapter": str(lora_dir)}}
    with pytest.raises(FamilyError, match="needs `of`"):
        load_family(write_yaml(tmp_path / "f.yaml", name="x", models=models, base="a"))
    models["t"]["of"] = "nope"
    with pytest.raises(FamilyError, match="'nope' is not one of the models"):
        load_family(write_yaml(tmp_path / "f.yaml", name="x", models=models, base="a"))


# ------------------------------------------------------------------ loading errors


def load_error(config: FamilyConfig | Path) -> str:
    with pytest.raises(FamilyError) as err:
        load_family(config)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_a_missing_path_names_the_entry(tmp_path):
    msg = load_error(FamilyConfig.single(str(tmp_path / "nowhere"), name="lost"))
    assert msg.startswith("model 'lost': no such file or directory")


def test_a_missing_gguf_file_names_the_entry(small_dir):
    msg = load_error(FamilyConfig.single(str(small_dir), gguf_file="x.gguf", name="q"))
    assert msg == f"model 'q': no GGUF file 'x.gguf' in {small_dir}"


def test_a_broken_config_names_the_entry(small_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in small_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    msg = load_error(FamilyConfig.single(str(broken), name="odd"))
    assert msg.startswith("model 'odd': cannot load") and "no-such-architecture" in msg


def test_a_missing_gguf_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails as if absent
    msg = load_error(FamilyConfig.single(str(tmp_path / "m.gguf"), name="q"))
    assert msg.startswith("model 'q':") and "pip install gguf" in msg


def test_the_cli_prints_a_load_error_as_one_line_and_exits_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"eft-serve: model 'missing': no such file or directory: {tmp_path / 'missing'}"
    )
