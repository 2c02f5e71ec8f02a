"""`eft-serve` argument handling that needs no model: --help, the missing demo family, bad
configs. (Serving, SIGTERM and the SDK are in test_openai_client.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server import cli


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "server.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--config", "--host", "--port", "--api-key", "--device", "--dtype",
                 "--max-batch-size", "--max-waiting", "--allow-negative-weights", "--log-level",
                 "--shutdown-timeout", "--threads", "--allowed-origins", "--max-body-bytes"):
        assert flag in out.stdout, flag
    assert "EFT_API_KEY" in out.stdout


def test_defaults_match_design():
    args = cli.build_parser().parse_args([])
    assert (args.host, args.port, args.config) == ("127.0.0.1", 8000, None)
    assert args.allow_negative_weights is False


def test_default_config_is_found_through_the_demo_package():
    import demo

    assert cli.default_config() == Path(demo.__file__).resolve().parent / "family/family.yaml"


def test_missing_demo_family_exits_2_with_a_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "default_config", lambda: tmp_path / "family" / "family.yaml")
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "family.yaml" in err


def test_bad_config_exits_2(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: {}\n")
    assert cli.main(["--config", str(bad)]) == 2
    assert "invalid family config" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--threads", "0"],
                                  ["--max-waiting", "-1"]])
def test_bad_numbers_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("EFT_API_KEY", "from-env")
    assert cli.build_parser().parse_args([]).api_key == "from-env"
