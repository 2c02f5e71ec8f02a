"""Programs write under out/ by default and never into docs/; `eft-sweep` resumes only from a
--json it was given; a figure without matplotlib is one line naming the extra, exit 2, before
any work is done."""

from __future__ import annotations

import json

import pytest

from evals import outputs, sweep


@pytest.fixture
def no_matplotlib(monkeypatch):
    real = outputs.importlib.util.find_spec
    monkeypatch.setattr(
        outputs.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )


SWEEP = ["--url", "http://127.0.0.1:9", "--model", "m", "--prompts", "a=p.jsonl",
         "--grid", "w=0", "--scorer", "exact"]  # fmt: skip


def test_plot_without_matplotlib_is_one_line_and_exit_2(no_matplotlib, capsys, tmp_path):
    assert sweep.main([*SWEEP, "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[plot]"' in err[0] and "--plot" in err[0]


def test_other_figures_without_matplotlib_exit_2(no_matplotlib, capsys, tmp_path):
    from demo import eval as demo_eval
    from demo import trace_figure
    from loadtest import __main__ as loadtest_main

    assert demo_eval.main(["--plot", str(tmp_path / "e.png")]) == 2
    assert trace_figure.main([]) == 2
    assert loadtest_main.main(["--concurrency", "1", "--plot", str(tmp_path / "l.png")]) == 2
    assert capsys.readouterr().err.count("[plot]") == 3


class _Stop(Exception):
    pass


@pytest.mark.parametrize("given", [False, True])
def test_sweep_resumes_only_from_the_json_it_was_given(given, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi", "expected": "x"}) + "\n")
    seen = {}

    class Probe:
        def __init__(self, path, header, fresh=False):
            seen.update(path=str(path), fresh=fresh)
            raise _Stop

    monkeypatch.setattr(sweep, "SweepFile", Probe)
    argv = [*SWEEP, *(["--json", "mine/s.json"] if given else [])]
    with pytest.raises(_Stop):
        sweep.main(argv)
    if given:
        assert seen == {"path": "mine/s.json", "fresh": False}
    else:
        assert seen == {"path": "out/sweep.json", "fresh": True}  # written afresh, never read
    assert (tmp_path / ("mine" if given else "out")).is_dir()


def test_defaults_are_under_out():
    from demo import eval as demo_eval
    from demo import trace_figure

    for mod in (demo_eval, trace_figure):
        src = mod.__file__ and open(mod.__file__).read()
        assert "default_out(" in src and 'default="docs/' not in src
    assert outputs.default_out("x.json") == "out/x.json"
