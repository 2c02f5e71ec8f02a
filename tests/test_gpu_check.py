"""The CUDA check script (`python -m loadtest.gpu_check`), in its CPU `--smoke` mode: it runs
end to end, reports every key, and imports nothing of the server (it must run on a bare CUDA
box)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import gpu_check

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "device", "torch", "transformers", "dtype", "base_layers", "note", "attention_backend",
    "cuda_graphs", "graphs_equal_eager", "greedy_tokens", "step_ms", "tokens_per_s",
    "eft_over_base", "syncs_per_step", "bandwidth", "elapsed_s", "step_ms_by_batch_graphs",
    "eft_graphs_over_eager", "syncs_per_step_graphs",
}  # fmt: skip


def test_smoke_run_reports_every_key(tmp_path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.gpu_check", "--smoke", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == result  # the one JSON printed
    assert KEYS <= set(result)
    assert result["smoke"] is True and result["base_layers"] == 2
    assert result["attention_backend"] in ("varlen", "exact")
    # The decode-graph buffers (replayed eagerly without CUDA) give the eager greedy tokens.
    assert result["graphs_equal_eager"] is True
    assert set(result["step_ms_by_batch_graphs"]) == {"1", "4"}
    # Three prompts, each with its greedy EFT tokens, equal (float32) to what each model's
    # own full forward gives: the paged runners and the EFT sum are wired right.
    greedy = result["greedy_tokens"]
    assert len(greedy) == 3 and all(len(t) == 8 for t in greedy)
    assert all(0 <= t < 512 for row in greedy for t in row)
    assert result["greedy_full_forward_equal"] is True
    assert set(result["step_ms"]) == {"base", "reference", "expert", "eft_total"}
    assert all(v > 0 for v in result["step_ms"].values())
    for kind in ("base_alone", "eft"):
        assert set(result["tokens_per_s"][kind]) == {"1", "4"}
        assert all(v > 0 for v in result["tokens_per_s"][kind].values())
    assert all(v > 0 for v in result["eft_over_base"].values())
    assert result["elapsed_s"] > 0
    if result["device"] == "cpu":  # the CUDA-only parts are null, and the note says why
        assert result["syncs_per_step"] is None
        assert result["bandwidth"]["eft_fraction_b1"] is None
        assert "no CUDA" in result["note"] and "not captured" in result["cuda_graphs"]


def test_import_pulls_in_no_server_dependency() -> None:
    code = (
        "import json, sys, loadtest.gpu_check; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pydantic', 'fastapi', 'server', 'uvicorn') or m == 'decoding.family')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == []


def test_shapes_are_the_real_models() -> None:
    # Llama-3.1-8B and Llama-3.2-1B parameter counts, from their shapes alone.
    assert gpu_check.params_of(gpu_check.BASE_SHAPE) == 8_030_261_248
    assert gpu_check.params_of(gpu_check.SMALL_SHAPE) == 1_235_814_400
    pool = 64 * 1024
    assert gpu_check.plan_base_layers(80 << 30, pool, 2) == 32  # an H100 holds the 8B
    fewer = gpu_check.plan_base_layers(24 << 30, pool, 2)
    assert 0 < fewer < 32


@pytest.mark.parametrize(
    "name, rate",
    [("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H200", 4.8e12),
     ("NVIDIA A100-SXM4-80GB", 2.04e12)],
)  # fmt: skip
def test_bandwidth_table(name, rate) -> None:
    assert next(r for key, r in gpu_check.BANDWIDTH if key in name) == rate
