"""The installed package's version, for `eft-serve --version` and `GET /version`.

Read from the installed distribution's metadata (pyproject.toml's `version`), so there is one
source; a checkout imported without being installed says so instead of guessing.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DIST_NAME = "eft-serve"


def package_version() -> str:
    try:
        return version(DIST_NAME)
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"
