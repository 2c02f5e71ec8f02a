"""The README works verbatim on a fresh clone: its commands name only flags the programs have,
write only under `out/`, install with the lock CI uses, and its test command is the one `.ci/run`
runs; its links and the docs' links resolve.

Commands that need a server, the network or a model download are checked against the
program's `--help` rather than run, so this stays fast (one `--help` per program).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BASH = re.compile(r"```bash\n(.*?)```", re.S)
# Flags whose value is a file the command writes.
OUTPUT_FLAGS = {"--json", "--csv", "--plot", "--out", "--markdown", "--frontier-plot", "--state"}


def commands() -> list[list[str]]:
    """Each command line of the README's bash blocks, continuations joined, comments cut."""
    out = []
    for block in BASH.findall(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "-", "}", '"')) or "'" in line.split("#")[0]:
                continue  # curl bodies (quoted JSON) are not commands
            words = shlex.split(line, comments=True)
            if words and words[-1] == "&":
                words = words[:-1]
            if words:
                out.append(words)
    return out


def program(words: list[str]) -> str | None:
    """The module a command runs (`eft-serve` -> server.cli), or None for other tools."""
    if words[0] == "eft-serve":
        return "server.cli"
    if words[0] == "eft-sweep":
        return "evals.sweep"
    if words[:2] == ["python", "-m"]:
        return words[2]
    return None


@cache
def help_text(module: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
        cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, f"python -m {module} --help: {proc.stderr}"
    return proc.stdout


PROGRAM_LINES = [w for w in commands() if program(w)]


def test_the_readme_shows_the_main_commands():
    progs = {program(w) for w in PROGRAM_LINES}
    assert {"server.cli", "evals.sweep"} <= progs


@pytest.mark.parametrize("words", PROGRAM_LINES, ids=[" ".join(w)[:60] for w in PROGRAM_LINES])
def test_readme_command_uses_only_flags_the_program_has(words):
    text = help_text(program(words))
    for word in words:
        if word.startswith("--"):
            flag = word.split("=")[0]
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", text), f"{flag} not in --help"


@pytest.mark.parametrize("words", PROGRAM_LINES, ids=[" ".join(w)[:60] for w in PROGRAM_LINES])
def test_readme_command_writes_only_under_out(words):
    for flag, value in zip(words, words[1:]):
        if flag in OUTPUT_FLAGS:
            assert value.startswith("out/"), f"{flag} {value}: outputs go under out/"
    assert not any(w.startswith("docs/") for w in words), "a command must not touch docs/"


def test_install_lines_use_the_lock_and_ci_runs_the_readme_test_command():
    installs = [w for w in commands() if w[:2] == ["pip", "install"] and "-e" in w]
    assert installs and all("requirements/lock.txt" in w for w in installs)
    assert (ROOT / "requirements/lock.txt").is_file()
    ci = (ROOT / ".ci/run").read_text()
    test_command = re.search(r'^TEST_COMMAND="(.*)"$', ci, re.M).group(1)
    assert [test_command.split()] == [w for w in commands() if w[0] == "pytest"]
    assert "-c requirements/lock.txt" in ci and "--upgrade" in ci
    # torch first, then the project: a CPU machine must not fetch the CUDA build
    quick = BASH.findall(README.split("## Quick start")[1])[0]
    assert quick.index("pip install torch==") < quick.index("pip install -c")


def test_the_lock_pins_exact_versions_within_pyproject_bounds():
    from packaging.requirements import Requirement

    lock = {}
    for line in (ROOT / "requirements/lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver, f"not an exact pin: {line}"
            lock[name.lower().replace("_", "-")] = ver
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for spec in reqs:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        if name == "torch":
            assert name not in lock  # one source for torch's pin: pyproject.toml
            continue
        assert name in lock, f"{name} is not locked"
        assert req.specifier.contains(lock[name]), f"{name}=={lock[name]} outside {req.specifier}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "doc", ["README.md", *sorted(p.name for p in (ROOT / "docs").glob("*.md"))]
)
def test_relative_links_resolve(doc):
    path = ROOT / doc if doc == "README.md" else ROOT / "docs" / doc
    text = path.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{doc}: broken link {target}"
        if anchor and dest.suffix == ".md":
            heads = {_slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
            assert anchor in heads, f"{doc}: no heading #{anchor} in {dest.name}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 360
    for notebook in ("the issue asks", "(missed)", "not rerun since", "commit `"):
        assert notebook not in README
    assert not re.search(r"\b[0-9a-f]{7,40}\b", re.sub(r"```.*?```", "", README, flags=re.S))
