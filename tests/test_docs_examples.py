"""The family files the README and docs/family.md show are valid family configs: a user who
copies one gets past config validation (loading the checkpoints is what they supply)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from decoding.family import FamilyConfig

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```yaml\n(.*?)```", re.S)


def family_blocks() -> list[tuple[str, str]]:
    out = []
    for doc in ("README.md", "docs/family.md"):
        for i, text in enumerate(BLOCK.findall((ROOT / doc).read_text())):
            if re.search(r"^models:", text, re.M) and re.search(r"^base:", text, re.M):
                out.append((f"{doc}#{i}", text))
    return out


def test_the_docs_show_the_worked_families() -> None:
    names = {yaml.safe_load(t)["name"] for _, t in family_blocks()}
    assert {"llama", "qwen", "gemma", "demo"} <= names


@pytest.mark.parametrize("where,text", family_blocks(), ids=[w for w, _ in family_blocks()])
def test_a_documented_family_file_is_a_valid_config(where: str, text: str) -> None:
    config = FamilyConfig.model_validate(yaml.safe_load(text))
    roles = [config.base, *([config.reference] if config.reference else []), *config.experts]
    assert all(r in config.models for r in roles), where
