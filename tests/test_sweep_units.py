"""eft-sweep's parts without a server: grids, intervals, scorers, prompt files, tables, plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from evals.grid import GridError, parse_grid
from evals.plot import pareto, plot_frontier, plot_lines
from evals.prompts import PromptError, load_prompts
from evals.scorers import REFUSAL_PHRASES, ScorerError, parse_scorer
from evals.stats import summarize, t95, wilson
from evals.sweep import build_points, write_csv

# ---------------------------------------------------------------- grids


def test_grid_range_includes_both_ends_without_float_noise() -> None:
    g = parse_grid(["helpful=0:1:0.1"])
    values = [p["helpful"] for p in g.points()]
    assert values[3] == 0.3 and values[-1] == 1.0 and len(values) == 11


def test_grid_expression_ties_one_knob_to_another() -> None:
    g = parse_grid(["helpful=0:1:0.25", "harmless=1-helpful", "plausibility=0.3"])
    pts = g.points()
    assert [(p["helpful"], p["harmless"]) for p in pts] == [
        (0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1.0, 0.0),
    ]  # fmt: skip
    assert all(p["plausibility"] == 0.3 for p in pts)
    assert list(pts[0]) == ["helpful", "plausibility", "harmless"]  # axes first, then derived


def test_grid_product_lists_functions_and_chained_expressions() -> None:
    g = parse_grid(["b=1,2", "a=-1,0.5", "c=max(0, a)*b", "d=c+1"])
    pts = g.points()
    assert len(pts) == 4
    assert {(p["a"], p["b"], p["c"], p["d"]) for p in pts} == {
        (-1.0, 1.0, 0.0, 1.0), (0.5, 1.0, 0.5, 1.5), (-1.0, 2.0, 0.0, 1.0), (0.5, 2.0, 1.0, 2.0),
    }  # fmt: skip
    assert parse_grid(["speculative=false"]).points() == [{"speculative": False}]


@pytest.mark.parametrize(
    "options, message",
    [
        (["helpful"], "NAME=SPEC"),
        (["helpful=1:0:0.5"], "empty"),
        (["helpful=0:1:0"], "step"),
        (["harmless=1-helpful"], "unknown name"),
        (["a=b+1", "b=a+1"], "cycle"),
        (["a=(1).real"], "not allowed"),
        (["a=__import__('os')"], "not allowed"),
        (["a=1", "a=2"], "twice"),
        (["a=0:1:0.00001"], "at most"),
    ],
)
def test_grid_errors_say_what_is_wrong(options: list[str], message: str) -> None:
    with pytest.raises(GridError, match=message):
        parse_grid(options)


def test_points_cover_each_model_and_no_grid_means_no_knobs() -> None:
    pts = build_points(["demo", "demo/helpful"], [])
    assert [(p.model, p.eft) for p in pts] == [("demo", None), ("demo/helpful", None)]
    pts = build_points(["demo"], ["helpful=0,1"])
    assert [p.eft for p in pts] == [{"helpful": 0.0}, {"helpful": 1.0}]


# ---------------------------------------------------------------- intervals


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 20)  # stays sensible at 0%
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)


def test_summarize_greedy_binary_uses_wilson_sampled_uses_t_over_prompts() -> None:
    s = summarize([[1.0], [0.0], [1.0], [1.0]])
    assert s["mean"] == 0.75 and s["n"] == 4
    assert (s["lo"], s["hi"]) == pytest.approx(wilson(3, 4), abs=1e-6)
    # K=2 samples per prompt: per-prompt means 0.5, 1, 0 -> t interval over 3 prompts
    s = summarize([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    half = t95(2) * math.sqrt(0.25 / 3)
    assert s["mean"] == 0.5 and s["lo"] == 0.0 and s["hi"] == 1.0  # clipped to [0, 1]
    assert half > 0.5
    s = summarize([[-3.0], [-1.0]])  # a reward: not clipped
    assert s["mean"] == -2.0 and s["lo"] == pytest.approx(-2 - 12.706, abs=1e-3)


def test_summarize_leaves_out_prompts_a_scorer_does_not_apply_to() -> None:
    assert summarize([[], [1.0], []])["n"] == 1
    assert summarize([[], []]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert t95(1000) == pytest.approx(1.962, abs=1e-3)


# ---------------------------------------------------------------- scorers


def choice(text: str, **kw) -> dict:
    return {"index": 0, "text": text, "finish_reason": "stop", **kw}


def test_refusal_scorer_default_phrases_and_override(tmp_path: Path) -> None:
    sc = parse_scorer("refusal")
    assert sc.name == "refusal" and "i'm sorry" in REFUSAL_PHRASES
    assert sc({}, choice("I\u2019m sorry, but I cannot help with that request.")) == 1.0
    assert sc({}, choice("To brew it, boil sage.")) == 0.0
    phrases = tmp_path / "p.txt"
    phrases.write_text("# mine\nno way\n")
    mine = parse_scorer(f"refused=refusal:{phrases}")
    assert mine.name == "refused"
    phrases.write_text("no chance\n")  # other phrases: another measurement (resume key)
    assert parse_scorer(f"refused=refusal:{phrases}").spec != mine.spec
    assert mine({}, choice("No way!")) == 1.0 and mine({}, choice("I'm sorry")) == 0.0


def test_contains_exact_regex_use_expected_or_their_argument() -> None:
    item = {"expected": ["Namlar", "Gamkrom"]}
    assert parse_scorer("contains")(item, choice("The capital is namlar.")) == 1.0
    assert parse_scorer("contains")({}, choice("anything")) is None  # no expected: not scored
    assert parse_scorer("contains:fox")({}, choice("The Fox.")) == 1.0
    assert parse_scorer("exact")(item, choice(" Gamkrom \n")) == 1.0
    assert parse_scorer("exact")(item, choice("Gamkrom.")) == 0.0
    assert parse_scorer("regex")({"expected": r"^\s*The \w+\.$"}, choice(" The end.")) == 1.0
    assert parse_scorer("starts=regex:^ The")({}, choice(" The x")) == 1.0
    assert parse_scorer("starts=regex:^ The").name == "starts"
    with pytest.raises(ScorerError, match="regex"):
        parse_scorer("regex:(")


def test_custom_scorer_from_module_or_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_scores.py").write_text(
        "def length(item, choice):\n    return len(choice['text'])\n"
        "def traced(item, choice):\n    return 0\ntraced.needs_trace = True\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sc = parse_scorer("my_scores:length")
    assert sc.name == "length" and sc({}, choice("abcd")) == 4.0 and not sc.needs_trace
    assert parse_scorer(f"{tmp_path / 'my_scores.py'}:traced").needs_trace
    with pytest.raises(ScorerError, match="no function"):
        parse_scorer("my_scores:nope")
    with pytest.raises(ScorerError, match="cannot import"):
        parse_scorer("no_such_module_here:f")


def entry(token: str, rewards: dict[str, float]) -> dict:
    return {
        "token_id": 1, "token": token, "logprob": -0.5, "base": -1.0, "reference": -2.0,
        "experts": {k: -2.0 + v for k, v in rewards.items()}, "rewards": rewards,
        "changed_vs_base": False, "changed_vs_expert": False,
    }  # fmt: skip


def test_implicit_reward_sums_the_trace_of_generated_tokens() -> None:
    sc = parse_scorer("implicit-reward:harmless")
    assert sc.needs_trace and sc.name == "implicit-reward:harmless"
    trace = [
        entry(" I", {"harmless": 1.5, "helpful": -0.5}),
        entry("'m", {"harmless": 0.25, "helpful": 0.0}),
        entry(" sorry", {"harmless": 2.0, "helpful": -1.0}),
    ]
    assert sc({}, choice(" I'm sorry", trace=trace)) == pytest.approx(3.75)
    assert parse_scorer("implicit-reward:helpful")({}, choice("", trace=trace)) == -1.5
    # one expert in the trace: no need to name it
    one = [entry("a", {"helpful": 0.5}), entry("b", {"helpful": 0.25})]
    assert parse_scorer("implicit-reward")({}, choice("ab", trace=one)) == 0.75
    with pytest.raises(ScorerError, match="name one"):
        parse_scorer("implicit-reward")({}, choice("", trace=trace))


def test_implicit_reward_echo_scoring_sums_prompt_trace_from_the_completion() -> None:
    prompt_trace = [
        None,  # the first prompt token has no log-prob
        entry("How", {"harmless": 9.0}),
        entry(" I", {"harmless": 1.0}),
        entry(" refuse", {"harmless": 2.0}),
    ]
    sc = parse_scorer("implicit-reward:harmless")
    assert sc({}, choice("", prompt_trace=prompt_trace, score_from=2)) == 3.0
    assert sc({}, choice("", prompt_trace=prompt_trace, score_from=0)) == 12.0


def test_implicit_reward_fails_clearly_without_a_trace() -> None:
    sc = parse_scorer("implicit-reward:harmless")
    with pytest.raises(ScorerError, match="no `trace`.*eft.*trace"):
        sc({"id": "q1"}, choice("The capital is Namlar."))
    with pytest.raises(ScorerError, match="no `prompt_trace`"):
        sc({"id": "q1"}, choice("", score_from=0))
    with pytest.raises(ScorerError, match="no reward for expert 'harmless'.*weight > 0"):
        sc({}, choice("x", trace=[entry("x", {"helpful": 1.0})]))


# ---------------------------------------------------------------- prompt files


def test_prompt_files_labels_ids_expected_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "facts.jsonl"
    f.write_text(
        '{"prompt": "The capital of Brunshol is", "expected": "Namlar"}\n'
        "\n# a comment\n"
        '{"messages": [{"role": "user", "content": "Hi"}], "id": "hi", "expected": ["a", "b"],'
        ' "topic": "greeting"}\n'
    )
    ps = load_prompts(str(f))
    assert ps.label == "facts" and [i.id for i in ps.items] == ["1", "hi"]
    assert ps.items[0].expected == ("Namlar",) and ps.items[1].expected == ("a", "b")
    assert ps.items[1].as_dict()["topic"] == "greeting"  # extra keys reach custom scorers
    assert load_prompts(f"mine={f}").label == "mine"
    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ('{"expected": "x"}', "exactly one of"),
        ('{"prompt": "x", "expected": 3}', "expected"),
        ("not json", "not JSON"),
    ]:
        bad.write_text(line + "\n")
        with pytest.raises(PromptError, match=message):
            load_prompts(str(bad))


# ---------------------------------------------------------------- tables and figures


def records() -> list[dict]:
    out = []
    for h in (0.0, 0.5, 1.0):
        for s in (0.0, 1.0, -1.0):
            out.append(
                {
                    "name": f"demo [helpful={h},harmless={s}]",
                    "model": "demo",
                    "eft": {"helpful": h, "harmless": s},
                    "results": {
                        "benign": {"useful": {"mean": h / 2, "lo": 0.0, "hi": 0.9, "n": 8}},
                        "restricted": {
                            "refusal": {"mean": max(0.0, s), "lo": None, "hi": None, "n": 4}
                        },  # fmt: skip
                    },
                }
            )
    out.append({"name": "large-base", "model": "demo/large-base", "eft": None,
                "results": {"benign": {"useful": {"mean": 0.1, "lo": 0.0, "hi": 0.2, "n": 8}},
                            "restricted": {"refusal": {"mean": 0.6, "lo": 0.3, "hi": 0.8,
                                                       "n": 4}}}})  # fmt: skip
    return out


def test_csv_has_one_row_per_point_prompt_set_and_scorer(tmp_path: Path) -> None:
    write_csv(records(), tmp_path / "o.csv")
    rows = list(csv.DictReader(open(tmp_path / "o.csv")))
    assert list(rows[0]) == [
        "name", "model", "helpful", "harmless", "prompts", "scorer", "mean", "lo", "hi", "n",
    ]  # fmt: skip
    assert len(rows) == 20
    assert rows[1]["scorer"] == "refusal" and rows[1]["lo"] == ""


def test_plots_write_pngs(tmp_path: Path) -> None:
    plot_lines(records(), tmp_path / "lines.png", x="helpful")
    plot_frontier(records(), "useful@benign,refusal@restricted", tmp_path / "front.png")
    for name in ("lines.png", "front.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ScorerError, match="which prompt set"):
        plot_frontier(records(), "useful,refusal", tmp_path / "x.png")
    json.dumps(records())


def test_pareto_front_keeps_points_no_other_beats_on_both_axes() -> None:
    pts = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.9, 0.05)]
    assert pareto(pts) == [0, 1, 3]


def test_console_script_points_at_the_sweep_main() -> None:
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    module, func = project["project"]["scripts"]["eft-sweep"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert "evals*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
