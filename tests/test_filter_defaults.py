"""`python -m evals.filter_defaults` on the demo family: its scores against a reference model.

With every expert weight at 0 the composition is the large base alone, so against
`large-base` itself, unfiltered, every answer must be identical; a nucleus of the base keeps
its top token, so greedy answers stay identical under `base_top_p` too.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evals import filter_defaults

DEMO = Path(__file__).resolve().parent.parent / "demo" / "family"


def test_the_base_alone_scores_as_its_own_reference(tmp_path, one_torch_thread):
    raw = yaml.safe_load((DEMO / "family.yaml").read_text())
    for spec in raw["models"].values():
        spec["path"] = str(DEMO / spec["path"])
    raw["defaults"] = {"helpful": 0.0, "harmless": 0.0}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "r.json"
    rc = filter_defaults.main([
        "--config", str(tmp_path / "f.yaml"), "--reference", "large-base", "--questions", "demo",
        "--limit", "8", "--base-top-p", "1,0.5", "--plausibility", "0", "--max-tokens", "12",
        "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["n"] == 8 and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["first_token"] == row["same_answer"] == 1.0, row
        assert row["fact"] == row["reference_fact"]


def test_question_sets():
    assert len(filter_defaults.questions("capitals", 100)) == 30
    demo = filter_defaults.questions("demo", 5)
    assert len(demo) == 5 and {"question", "answer"} <= set(demo[0])
