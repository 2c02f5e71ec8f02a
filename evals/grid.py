"""Knob grids: `--grid NAME=SPEC` options expanded into the list of `eft` dicts to request.

A SPEC is one of
- a range `START:STOP:STEP`, both ends included (`helpful=0:1:0.25` -> 0, 0.25, 0.5, 0.75, 1);
- a list `V1,V2,...` of numbers or `true`/`false` (a single value fixes the key:
  `plausibility=0.3`);
- an expression over other keys of the grid (`harmless=1-helpful`, `harmless=max(0, 1-helpful)`):
  numbers, knob names, `+ - * / **`, parentheses, `min`, `max`, `abs`.

Ranges and lists are axes (the grid is their Cartesian product, in the order given); expressions
are computed per point from the axes and from each other. Any `eft` key can be swept, the
experts' weights and the filters alike: the server decides what it accepts.
"""

from __future__ import annotations

import ast
import itertools
import math
import operator
import re
from dataclasses import dataclass

Value = float | bool

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"min": min, "max": max, "abs": abs}
MAX_POINTS = 10_000  # a typo like `0:1:0.0001` should fail fast, not queue a million requests


class GridError(ValueError):
    """A grid option that cannot be parsed or evaluated."""


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[Value, ...]


@dataclass(frozen=True)
class Derived:
    name: str
    source: str
    tree: ast.Expression

    def names(self) -> set[str]:
        return {n.id for n in ast.walk(self.tree) if isinstance(n, ast.Name) and n.id not in _FUNCS}


@dataclass(frozen=True)
class Grid:
    axes: tuple[Axis, ...]
    derived: tuple[Derived, ...]  # in an order where each one's inputs come first

    @property
    def keys(self) -> list[str]:
        return [a.name for a in self.axes] + [d.name for d in self.derived]

    def points(self) -> list[dict[str, Value]]:
        out = []
        for combo in itertools.product(*(a.values for a in self.axes)):
            point: dict[str, Value] = dict(zip((a.name for a in self.axes), combo))
            for d in self.derived:
                point[d.name] = _clean(_eval(d.tree.body, point, d))
            out.append({k: point[k] for k in self.keys})
        return out


def _clean(x: float | bool) -> Value:
    """Round away float noise (0.1 * 3 -> 0.3) so keys and JSON stay readable and stable."""
    if isinstance(x, bool):
        return x
    x = float(x)
    if not math.isfinite(x):
        raise GridError(f"grid value {x} is not finite")
    return round(x, 10) + 0.0  # + 0.0 turns -0.0 into 0.0


def _number(text: str) -> Value:
    t = text.strip().lower()
    if t in ("true", "false"):
        return t == "true"
    return _clean(float(t))


def _range(spec: str) -> tuple[float, ...]:
    start, stop, step = (float(p) for p in spec.split(":"))
    if step <= 0 or not all(map(math.isfinite, (start, stop, step))):
        raise GridError(f"range {spec!r}: the step must be a finite number > 0")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count < 1:
        raise GridError(f"range {spec!r} is empty (START must not exceed STOP)")
    if count > MAX_POINTS:
        raise GridError(f"range {spec!r} has {count} values (at most {MAX_POINTS})")
    return tuple(_clean(start + i * step) for i in range(count))


def _eval(node: ast.AST, env: dict[str, Value], d: Derived) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(env[node.id])
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        try:
            return _BINOPS[type(node.op)](_eval(node.left, env, d), _eval(node.right, env, d))
        except (ZeroDivisionError, OverflowError) as exc:
            raise GridError(f"{d.name}={d.source}: {exc} at {env}") from exc
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand, env, d))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCS
        and not node.keywords
        and node.args
    ):
        return float(_FUNCS[node.func.id](*(_eval(a, env, d) for a in node.args)))
    raise GridError(f"{d.name}={d.source}: {ast.dump(node)[:60]} is not allowed in an expression")


_ALLOWED = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, *_BINOPS, *_UNARY)


def _check(tree: ast.Expression, where: str) -> None:
    """Only arithmetic on numbers and knob names, and min/max/abs: refused when parsed."""
    for node in ast.walk(tree):
        ok = isinstance(node, _ALLOWED) or (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        )
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords
        if not ok:
            raise GridError(
                f"--grid {where}: {type(node).__name__} is not allowed in an expression"
            )


def _split(option: str) -> tuple[str, str]:
    name, sep, spec = option.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not _NAME.match(name) or not spec:
        raise GridError(f"--grid {option!r}: expected NAME=SPEC (e.g. helpful=0:1:0.25)")
    return name, spec


def parse_grid(options: list[str]) -> Grid:
    """Parse `--grid` options into axes and derived keys; names must not repeat."""
    axes: list[Axis] = []
    derived: dict[str, Derived] = {}
    seen: set[str] = set()
    for option in options:
        name, spec = _split(option)
        if name in seen:
            raise GridError(f"--grid {name} is given twice")
        seen.add(name)
        try:
            if ":" in spec:
                axes.append(Axis(name, _range(spec)))
            else:
                axes.append(Axis(name, tuple(_number(v) for v in spec.split(","))))
            continue
        except ValueError as exc:  # not numbers: an expression (GridError is kept)
            if isinstance(exc, GridError):
                raise
        try:
            tree = ast.parse(spec, mode="eval")
        except SyntaxError as exc:
            msg = f"--grid {option!r}: neither a range, a list nor an expression"
            raise GridError(msg) from exc
        _check(tree, f"{name}={spec}")
        derived[name] = Derived(name, spec, tree)
    for d in derived.values():  # unknown names before evaluation, with the option that has them
        unknown = d.names() - seen
        if unknown:
            raise GridError(f"--grid {d.name}={d.source}: unknown name(s) {sorted(unknown)}")
    order: list[Derived] = []
    done = {a.name for a in axes}
    pending = dict(derived)
    while pending:
        ready = [d for d in pending.values() if d.names() <= done]
        if not ready:
            raise GridError(f"--grid expressions refer to each other in a cycle: {sorted(pending)}")
        for d in ready:
            order.append(d)
            done.add(d.name)
            del pending[d.name]
    grid = Grid(tuple(axes), tuple(order))
    total = math.prod(len(a.values) for a in axes)
    if total > MAX_POINTS:
        raise GridError(f"the grid has {total} points (at most {MAX_POINTS})")
    return grid
