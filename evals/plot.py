"""Figures of a sweep (matplotlib, the `plot` extra): lines over a knob, or a 2-scorer frontier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.scorers import ScorerError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def swept_knobs(records: Sequence[dict[str, Any]]) -> list[str]:
    """The knobs that take more than one value over the records, in first-seen order."""
    seen: dict[str, set[Any]] = {}
    for r in records:
        for k, v in (r.get("eft") or {}).items():
            seen.setdefault(k, set()).add(v)
    return [k for k, vs in seen.items() if len(vs) > 1]


def _depends_on(records: Sequence[dict[str, Any]], knob: str, x: str) -> bool:
    """True if `knob` is a function of `x` over the records (e.g. harmless = 1 - helpful)."""
    by_x: dict[Any, set[Any]] = {}
    for r in records:
        eft = r.get("eft") or {}
        by_x.setdefault(eft.get(x), set()).add(eft.get(knob))
    return all(len(vs) == 1 for vs in by_x.values())


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def plot_lines(records: Sequence[dict[str, Any]], path: str | Path, x: str | None = None) -> None:
    """Each scorer's mean (95% band) over knob `x`, a line per prompt set and other setting.

    Points without the knob (single models, baselines) are dotted level lines named by row.

    Scorers whose means all lie in [0, 1] (rates) share the first panel; any other scorer (an
    implicit reward, a custom score) gets a panel of its own.
    """
    plt = _pyplot()
    swept = swept_knobs(records)
    x = x or (swept[0] if swept else None)
    if x is not None and not any(x in (r.get("eft") or {}) for r in records):
        raise ScorerError(f"--x {x}: no point has that knob (knobs: {swept})")
    group_keys = [k for k in swept if k != x and not _depends_on(records, k, x)] if x else []
    scorers = [(label, sc) for label, by in records[0]["results"].items() for sc in by]
    unit, other = [], []
    for label, sc in scorers:
        means = [r["results"][label][sc]["mean"] for r in records]
        in_unit = all(m is None or 0.0 <= m <= 1.0 for m in means)
        (unit if in_unit else other).append((label, sc))
    panels = ([unit] if unit else []) + [[s] for s in other]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    multi_label = len(records[0]["results"]) > 1
    for ax, panel in zip(axes[0], panels):
        for label, sc in panel:
            groups: dict[tuple, list[dict[str, Any]]] = {}
            for r in records:
                eft = r.get("eft") or {}
                if x is not None and x not in eft:  # a baseline (a single model): a level line
                    m = r["results"][label][sc]["mean"]
                    if m is not None:
                        ax.axhline(m, ls=":", lw=1, color="gray")
                        ax.annotate(f"{r['name']} ({sc})", (0.01, m), xycoords=("axes fraction",
                                    "data"), fontsize=6, color="gray")  # fmt: skip
                    continue
                gk = (r["model"], *(eft.get(k) for k in group_keys))
                groups.setdefault(gk, []).append(r)
            for gk, rs in groups.items():
                if x is not None:
                    rs = sorted(rs, key=lambda r: (r.get("eft") or {}).get(x, 0))
                    xs = [(r.get("eft") or {}).get(x) for r in rs]
                else:
                    xs = list(range(len(rs)))
                stats = [r["results"][label][sc] for r in rs]
                ys = [s["mean"] for s in stats]
                if all(y is None for y in ys):
                    continue  # the scorer does not apply to this prompt set
                name = sc + (f" @ {label}" if multi_label else "")
                if len(groups) > 1:
                    extra = [gk[0]] if len({g[0] for g in groups}) > 1 else []
                    extra += [f"{k}={_fmt(v)}" for k, v in zip(group_keys, gk[1:])]
                    name += f" ({', '.join(extra)})"
                (line,) = ax.plot(xs, ys, "o-", label=name, ms=4)
                lo = [s["lo"] if s["lo"] is not None else s["mean"] for s in stats]
                hi = [s["hi"] if s["hi"] is not None else s["mean"] for s in stats]
                if all(v is not None for v in lo + hi):
                    ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        if x is None:
            ax.set_xticks(range(len(records)), [r["name"] for r in records], rotation=20)
        else:
            ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _axis(spec: str, labels: list[str]) -> tuple[str, str]:
    scorer, _, label = spec.strip().partition("@")
    if not label:
        if len(labels) != 1:
            msg = f"--frontier {spec}: say which prompt set, as {scorer}@LABEL {labels}"
            raise ScorerError(msg)
        label = labels[0]
    if label not in labels:
        raise ScorerError(f"--frontier {spec}: no prompt set {label!r} (have {labels})")
    return scorer, label


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better), by x."""
    idx = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], float("-inf")
    for i in idx:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def plot_frontier(
    records: Sequence[dict[str, Any]],
    spec: str,
    path: str | Path,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> None:
    """Scorer Y against scorer X, one point per record, with 95% error bars.

    With two or more swept knobs, points sharing the first knob's value are joined (ordered by
    the second, whose values label the points). Points without knobs (single models, baselines)
    are black stars named by their row; red rings mark points with a negative weight. The
    dashed line is the Pareto front of the knob settings (higher is better on both axes).
    """
    plt = _pyplot()
    labels = list(records[0]["results"])
    try:
        xs_spec, ys_spec = spec.split(",")
    except ValueError as exc:
        raise ScorerError(f"--frontier {spec!r}: expected XSCORER[@LABEL],YSCORER[@LABEL]") from exc
    (xsc, xl), (ysc, yl) = _axis(xs_spec, labels), _axis(ys_spec, labels)
    for sc, label in ((xsc, xl), (ysc, yl)):
        if sc not in records[0]["results"][label]:
            have = list(records[0]["results"][label])
            raise ScorerError(f"--frontier: no scorer {sc!r} (have {have})")

    def xy(r: dict[str, Any]) -> tuple[Any, Any]:
        return r["results"][xl][xsc], r["results"][yl][ysc]

    fig, ax = plt.subplots(figsize=(8, 4.8))
    knobbed = [r for r in records if r.get("eft") and xy(r)[0]["mean"] is not None]
    swept = swept_knobs(knobbed)
    first = swept[0] if swept else None
    free = [k for k in swept[1:] if not _depends_on(knobbed, k, first)]  # not harmless=1-helpful
    second = free[0] if free else None
    cmap = plt.get_cmap("viridis")
    groups: dict[Any, list[dict[str, Any]]] = {}
    for r in knobbed:
        groups.setdefault(r["eft"].get(first) if first else None, []).append(r)
    keys = sorted(groups, key=lambda v: (v is None, v))
    n_neg = 0  # negative-weight labels so far: stacked so they do not overlap
    for i, gv in enumerate(keys):
        rs = sorted(groups[gv], key=lambda r: r["eft"].get(second, 0) if second else 0)
        color = cmap(i / max(1, len(keys) - 1))
        px = [xy(r)[0]["mean"] for r in rs]
        py = [xy(r)[1]["mean"] for r in rs]
        name = f"{first} = {_fmt(gv)}" if first else "grid"
        ax.plot(px, py, "o-" if second else "o", color=color, label=name, ms=5, lw=1)
        for r, a, b in zip(rs, px, py):
            sx, sy = xy(r)
            if None not in (sx["lo"], sx["hi"], sy["lo"], sy["hi"]):
                xerr = [[a - sx["lo"]], [sx["hi"] - a]]
                yerr = [[b - sy["lo"]], [sy["hi"] - b]]
                ax.errorbar(a, b, xerr=xerr, yerr=yerr, color=color, alpha=0.25, lw=0.8)
            negative = [k for k, v in r["eft"].items() if isinstance(v, float) and v < 0]
            if negative:
                ax.plot([a], [b], "o", ms=11, mfc="none", mec="red", mew=1.2)
                text = ", ".join(f"{k}={_fmt(r['eft'][k])}" for k in (first, second) if k)
                ax.annotate(text, (a, b), fontsize=6, color="red", xytext=(8, -12 - 9 * n_neg),
                            textcoords="offset points")  # fmt: skip
                n_neg += 1
            elif second:
                ax.annotate(_fmt(r["eft"].get(second)), (a, b), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    for r in records:
        if r.get("eft"):
            continue
        sx, sy = xy(r)
        ax.plot([sx["mean"]], [sy["mean"]], "k*", ms=9)
        ax.annotate(r["name"], (sx["mean"], sy["mean"]), fontsize=7, xytext=(4, -9),
                    textcoords="offset points")  # fmt: skip
    # The front the knobs reach (baselines are references, not settings one can choose).
    pts = [(xy(r)[0]["mean"], xy(r)[1]["mean"]) for r in knobbed]
    pts = [p for p in pts if None not in p]
    front = pareto(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=0.8,
            label="Pareto front")  # fmt: skip
    ax.set_xlabel(xlabel or f"{xsc} @ {xl}")
    ax.set_ylabel(ylabel or f"{ysc} @ {yl}")
    if any(
        isinstance(v, float) and v < 0 for r in knobbed for v in r["eft"].values()
    ):  # the legend entry of the red rings
        ax.plot([], [], "o", ms=8, mfc="none", mec="red", label="a negative weight")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title_fontsize=7,
              title=f"point labels: {second}" if second else None)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
