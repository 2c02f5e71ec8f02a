"""The paged-KV server surface without a model: the size parser, the memory and caching flags
reaching EngineConfig, and the step observer turning the KV, prefix-cache and preemption
figures of a StepStats into Prometheus samples."""

from __future__ import annotations

import pytest

from decoding.config import EngineConfig
from decoding.request import StepStats
from server import cli
from server.metrics import ServerMetrics

GIB = 1024**3


@pytest.mark.parametrize(
    "text,size",
    [
        ("1073741824", GIB),
        ("512MiB", 512 * 1024**2),
        ("8GB", 8 * 1000**3),
        ("1.5GiB", 3 * GIB // 2),
        ("64k", 64_000),
        ("64KiB", 65_536),
        ("2kB", 2000),
        ("4 gib", 4 * GIB),
        ("1TB", 10**12),
        ("100B", 100),
        ("0.5MB", 500_000),
    ],
)
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "GiB", "-1GiB", "0", "0MiB", "1.5", "1e9", "8 GiBs", "8XB", "nan", "1,5GiB"]
)
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        cli.parse_size(text)


def test_defaults_are_the_engine_defaults():
    """No flag given: the engine decides, exactly as an EngineConfig() would."""
    cfg = cli.engine_config(cli.build_parser().parse_args([]))
    default = EngineConfig()
    for field in (
        "kv_cache_memory",
        "gpu_memory_utilization",
        "block_size",
        "prefix_caching",
        "cuda_graphs",
        "max_num_batched_tokens",
    ):
        assert getattr(cfg, field) == getattr(default, field), field


def test_flags_reach_engine_config():
    args = cli.build_parser().parse_args(
        [
            "--kv-cache-memory",
            "1.5GiB",
            "--gpu-memory-utilization",
            "0.5",
            "--block-size",
            "32",
            "--no-prefix-caching",
            "--cuda-graphs",
            "off",
            "--max-batch-size",
            "4",
            "--max-num-batched-tokens",
            "256",
        ]
    )
    cfg = cli.engine_config(args)
    assert cfg.kv_cache_memory == 3 * GIB // 2
    assert cfg.gpu_memory_utilization == 0.5
    assert (cfg.block_size, cfg.prefix_caching, cfg.cuda_graphs) == (32, False, "off")
    assert (cfg.max_batch_size, cfg.max_num_batched_tokens) == (4, 256)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--kv-cache-memory", "lots"),
        ("--kv-cache-memory", "0"),
        ("--gpu-memory-utilization", "0"),
        ("--gpu-memory-utilization", "1.2"),
        ("--gpu-memory-utilization", "nan"),
        ("--block-size", "0"),
        ("--block-size", "48"),
        ("--block-size", "512"),
        ("--cuda-graphs", "always"),
    ],
)
def test_bad_values_are_argparse_errors_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args([flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_block_sizes_accepted():
    for n in (1, 2, 16, 256):
        assert cli.build_parser().parse_args(["--block-size", str(n)]).block_size == n


# --- metrics ---------------------------------------------------------------------------------


def sample(m: ServerMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_new_series_exist_from_the_first_scrape():
    m = ServerMetrics(["big", "small"], ["small"])
    for model in ("big", "small"):
        for name in (
            "eft_kv_cache_capacity_bytes",
            "eft_prefix_cache_queries_total",
            "eft_prefix_cache_hits_total",
        ):
            assert sample(m, name, model=model) == 0, (name, model)
    assert sample(m, "eft_kv_cache_usage") == 0
    assert sample(m, "eft_num_preemptions_total") == 0


def test_step_stats_become_samples():
    m = ServerMetrics(["big", "small"], ["small"])
    step = StepStats(
        batch_size=2,
        num_running=2,
        num_waiting=1,
        kv_cache_tokens={"big": 40, "small": 40},
        kv_cache_bytes={"big": 3 << 20, "small": 1 << 20},
        kv_cache_capacity_bytes={"big": 12 << 20, "small": 4 << 20, "intruder": 1},
        kv_cache_usage=0.25,
        prefix_cache_queries={"big": 32, "small": 32, "intruder": 5},
        prefix_cache_hits={"big": 16, "small": 0},
        preemptions=1,
    )
    m.on_step(step)
    m.on_step(step)  # counters add up step by step; gauges hold the latest
    assert sample(m, "eft_kv_cache_bytes", model="big") == 3 << 20
    assert sample(m, "eft_kv_cache_capacity_bytes", model="big") == 12 << 20
    assert sample(m, "eft_kv_cache_capacity_bytes", model="small") == 4 << 20
    assert sample(m, "eft_kv_cache_usage") == 0.25
    assert sample(m, "eft_prefix_cache_queries_total", model="big") == 64
    assert sample(m, "eft_prefix_cache_hits_total", model="big") == 32
    assert sample(m, "eft_prefix_cache_hits_total", model="small") == 0
    assert sample(m, "eft_num_preemptions_total") == 2
    # a model name not fixed at start creates no series
    assert sample(m, "eft_kv_cache_capacity_bytes", model="intruder") is None
    assert sample(m, "eft_prefix_cache_queries_total", model="intruder") is None


def test_report_without_kv_figures_keeps_occupancy():
    """The report after a cancel has no KV figures: its default usage of 0 must not blank the
    gauge while requests still run, but when nothing runs or waits nothing is in use."""
    m = ServerMetrics(["big"], [])
    m.on_step(
        StepStats(
            1,
            1,
            0,
            kv_cache_tokens={"big": 9},
            kv_cache_bytes={"big": 4096},
            kv_cache_capacity_bytes={"big": 1 << 20},
            kv_cache_usage=0.5,
        )
    )
    m.on_step(StepStats(0, 1, 0))
    assert sample(m, "eft_kv_cache_usage") == 0.5
    assert sample(m, "eft_kv_cache_bytes", model="big") == 4096
    m.on_step(StepStats(0, 0, 0))
    assert sample(m, "eft_kv_cache_usage") == 0
    assert sample(m, "eft_kv_cache_bytes", model="big") == 0
    assert sample(m, "eft_kv_cache_tokens", model="big") == 0
    # the pool itself stays allocated
    assert sample(m, "eft_kv_cache_capacity_bytes", model="big") == 1 << 20


def test_help_lists_the_memory_flags():
    text = cli.build_parser().format_help()
    for flag in (
        "--kv-cache-memory",
        "--gpu-memory-utilization",
        "--block-size",
        "--no-prefix-caching",
        "--cuda-graphs",
    ):
        assert flag in text, flag
