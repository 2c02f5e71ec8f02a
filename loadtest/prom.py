"""Reading the server's Prometheus text: samples by name, and histogram means between scrapes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Sample name (with its `_sum`/`_count`/`_bucket` suffix) -> [(labels, value)]."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {labels.get(label, ""): v for labels, v in samples.get(name, [])}


def histogram_mean_delta(
    before: Samples, after: Samples, name: str, label: str
) -> dict[str, tuple[float, float]]:
    """Per label value: (mean seconds, observations) of histogram `name` between two scrapes."""
    s0, s1 = by_label(before, f"{name}_sum", label), by_label(after, f"{name}_sum", label)
    c0, c1 = by_label(before, f"{name}_count", label), by_label(after, f"{name}_count", label)
    out = {}
    for key, total in s1.items():
        count = c1.get(key, 0.0) - c0.get(key, 0.0)
        if count > 0:
            out[key] = ((total - s0.get(key, 0.0)) / count, count)
    return out
