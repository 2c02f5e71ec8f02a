"""Every model of a family starts the assistant's answer alike (decoding/boundary.py).

`plain` ends with the whitespace the family's chat templates end with, the textual verdict
(`eft-serve --check`) compares the renderings without weights, and the engine's startup probe
compares the first answer token each composed model prefers, warning in one line when they
disagree. The startup probe runs on the demo family's trained weights; SmolLM2's real
tokenizer (tests/data) gives the renderings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from test_family_vocab import INSTRUCT_TEMPLATE, smollm2_tokenizer  # tests/ is on sys.path

from decoding import boundary
from decoding.engine import Engine, EngineConfig
from decoding.family import FamilyConfig, load_family

DEMO = Path(__file__).resolve().parent.parent / "demo" / "family"
LLAMA3_LIKE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_LIKE = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
OLD_PLAIN = (  # what `plain` rendered before it followed the experts: "Assistant:" alone
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "Assistant:"
)


@pytest.mark.parametrize(
    ("template", "ending"),
    [(INSTRUCT_TEMPLATE, "\n"), (LLAMA3_LIKE, "\n\n"), (MISTRAL_LIKE, "")],
)
def test_plain_ends_with_the_whitespace_of_the_experts_template(template, ending):
    base, chat = smollm2_tokenizer("base"), smollm2_tokenizer("instruct")
    chat.chat_template = template
    ws = boundary.answer_whitespace([(chat, "tokenizer"), (base, "plain")])
    assert ws == ending
    text, special = boundary.render_text(base, "plain", boundary.PROBE, ws)
    assert text == "User: What is the capital of France?\nAssistant:" + ending and special


def test_a_family_of_plain_models_keeps_the_plain_ending():
    base = smollm2_tokenizer("base")  # no chat template: `tokenizer` falls back to plain
    assert boundary.answer_whitespace([(base, "tokenizer"), (base, "plain")]) == ""


def test_smollm2_family_renders_the_base_answer_start_as_the_chat_template_does(tmp_path):
    from test_family_vocab import save_model

    base_tok, inst_tok = smollm2_tokenizer("base"), smollm2_tokenizer("instruct")
    models = {"base": save_model(tmp_path / "b", base_tok, 1),
              "chat": save_model(tmp_path / "c", inst_tok, 2)}  # fmt: skip
    cfg = FamilyConfig(
        name="smol",
        models={"base": {"path": str(models["base"]), "chat_template": "plain"},
                "small": {"path": str(models["base"]), "chat_template": "plain"},
                "chat": {"path": str(models["chat"])}},
        base="base", reference="small", experts=["chat"],
    )  # fmt: skip
    family = load_family(cfg)
    prompts = family.render_chat(boundary.PROBE)
    tok = family.tokenizer
    assert tok.decode(prompts["base"]).endswith("\nAssistant:\n")
    assert tok.decode(prompts["chat"]).endswith("<|im_start|>assistant\n")
    # The first answer word is the same token after either rendering: "The", not " The".
    for name in ("base", "chat"):
        text = tok.decode(prompts[name]) + "The capital"
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids[-2]) == "The"


def test_textual_verdict_names_the_models_whose_rendering_ends_differently():
    base, chat = smollm2_tokenizer("base"), smollm2_tokenizer("instruct")
    ws = boundary.answer_whitespace([(chat, "tokenizer")])
    aligned = boundary.textual_verdict(
        {"base": (base, "plain"), "small": (base, "plain"), "chat": (chat, "tokenizer")}, ws
    )
    assert aligned.aligned, aligned.line()
    assert {s.text for s in aligned.starts} == {"The"}
    apart = boundary.textual_verdict({"base": (base, OLD_PLAIN), "chat": (chat, "tokenizer")}, ws)
    assert not apart.aligned
    line = apart.line()
    assert "base" in line and "chat" in line and "chat_template: plain" in line
    assert [s.ending for s in apart.starts] == ["", "\n"]


def _demo_config(template_of_bases: str | None) -> FamilyConfig:
    raw = yaml.safe_load((DEMO / "family.yaml").read_text())
    for spec in raw["models"].values():
        spec["path"] = str(DEMO / spec["path"])
    if template_of_bases is not None:
        for name in ("large-base", "small-base"):
            raw["models"][name]["chat_template"] = template_of_bases
    return FamilyConfig.model_validate(raw)


def _startup_records(caplog, config: FamilyConfig) -> list[logging.LogRecord]:
    family = load_family(config)
    with caplog.at_level(logging.INFO, logger="decoding.boundary"):
        Engine(family, EngineConfig(max_batch_size=2, kv_cache_memory=8 << 20))
    return [r for r in caplog.records if r.name == "decoding.boundary"]


def test_demo_family_starts_answers_alike_without_a_warning(caplog, one_torch_thread):
    (record,) = _startup_records(caplog, _demo_config(None))
    assert record.levelno == logging.INFO
    assert "answer boundary aligned" in record.getMessage()


def test_startup_warns_in_one_line_when_bases_end_their_prompt_with_a_space(
    caplog, one_torch_thread
):
    # The classic trap: a template that ends in a space, after which the demo's bases prefer a
    # bare word ("ram") while the experts prefer a space-led one (" The").
    own = (DEMO / "large-base" / "chat_template.jinja").read_text()
    spaced = own.replace("<|assistant|>{% endif %}", "<|assistant|> {% endif %}")
    assert spaced != own
    (record,) = _startup_records(caplog, _demo_config(spaced))
    assert record.levelno == logging.WARNING
    line = record.getMessage()
    assert "\n" not in line
    for name in ("large-base", "small-base", "helpful", "harmless", "chat_template: plain"):
        assert name in line


def test_a_template_that_refuses_the_probe_chat_does_not_stop_the_server(caplog, one_torch_thread):
    config = _demo_config(None)
    config.models["helpful"].chat_template = "{{ raise_exception('system message required') }}"
    # One warning while loading (`plain` cannot follow that template) and one at startup.
    loading, startup = _startup_records(caplog, config)
    assert loading.levelno == startup.levelno == logging.WARNING
    assert "cannot render a probe chat" in loading.getMessage()
    assert "probe failed" in startup.getMessage()
    assert "system message required" in startup.getMessage()


def test_the_probe_renders_only_the_composed_models(caplog, one_torch_thread):
    # large-helpful is served alone (demo/large-helpful) and takes no part in the composition.
    config = _demo_config(None)
    config.models["large-helpful"].chat_template = "{{ raise_exception('not composed') }}"
    (record,) = _startup_records(caplog, config)
    assert record.levelno == logging.INFO
    assert "answer boundary aligned" in record.getMessage()
    assert "large-helpful" not in record.getMessage()
