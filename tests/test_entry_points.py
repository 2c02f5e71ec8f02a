"""Every `python -m` program of the repository names itself in `--help` and explains each option.

Read from the source (no imports, no subprocess), so it stays instant: argparse's default
program name is the file's (`__main__.py`, `kv_bench.py`), which is not what a user types.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pyproject's console scripts, module -> command (`evals.sweep` runs as `eft-sweep`)
SCRIPTS = {module: name for name, module in re.findall(
    r'^([\w-]+) = "([\w.]+):\w+"$', (ROOT / "pyproject.toml").read_text(), re.M)}  # fmt: skip


def programs() -> list[Path]:
    found = []
    for package in ("loadtest", "evals", "demo"):
        for path in sorted((ROOT / package).glob("*.py")):
            text = path.read_text()
            if path.name == "__main__.py" or 'if __name__ == "__main__"' in text:
                found.append(path)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__main__" else parts)


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == name]  # fmt: skip


@pytest.mark.parametrize("path", programs(), ids=module_name)
def test_program_help_names_the_command_and_every_option(path):
    tree = ast.parse(path.read_text())
    parsers = calls(tree, "ArgumentParser")
    assert parsers, f"{path.name} runs as a program but builds no ArgumentParser"
    module = module_name(path)
    for parser in parsers:
        prog = {kw.arg: kw.value for kw in parser.keywords}.get("prog")
        assert isinstance(prog, ast.Constant), f"{module}: ArgumentParser without prog="
        assert prog.value in (f"python -m {module}", SCRIPTS.get(module)), prog.value
    for arg in calls(tree, "add_argument"):
        keywords = {kw.arg for kw in arg.keywords}
        flag = arg.args[0].value if arg.args and isinstance(arg.args[0], ast.Constant) else "?"
        assert "help" in keywords, f"{module}: {flag} has no help text"
