"""LoRA experts as adapters (one batched forward with their model) vs the same experts as
separate merged models, side by side (no HTTP).

    python -m loadtest.adapter_bench [--config FAMILY.yaml] [--adapters 2] [--rank 16]

Writes `--adapters` random LoRA adapters (rank `--rank`, every linear layer) over the family's
reference, and their merged copies, into a temporary folder; then builds two families from the
family's base and reference: one whose experts are adapter entries (the reference and its
adapters run as one forward per step) and one whose experts are the merged checkpoints (one
forward each). An in-process `Engine` runs 16 rows (and 1) that use every expert; the median
decode-step times of the two families, measured in alternating rounds so load drift hits both,
give `adapter_step_ratio` = merged step time / adapter step time (above 1: adapters faster),
and the same ratio for the forward time of the reference and experts alone (the part adapters
change; the base's forward, equal in both, dominates the step of a family with a large base).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from decoding.family import FamilyConfig, load_family
from decoding.request import StepStats
from loadtest.engine_bench import decode_step_seconds

DEMO = Path(__file__).resolve().parent.parent / "demo" / "family" / "family.yaml"
TARGETS = "all-linear"  # every linear layer but the output head, whatever the architecture


def write_families(config_path: Path, out: Path, adapters: int, rank: int) -> tuple[Path, Path]:
    """The (adapter, merged) family YAMLs over `config_path`'s base and reference."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    config = FamilyConfig.from_yaml(config_path)
    root = config_path.parent

    def path_of(name: str) -> str:
        p = Path(config.models[name].path)
        return str(p if p.is_absolute() else root / p)

    ref = path_of(config.reference)
    common = {"base": {"path": path_of(config.base)}, "ref": {"path": ref}}
    adapted, merged = dict(common), dict(common)
    for i in range(adapters):
        torch.manual_seed(i)
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                          init_lora_weights=False)  # fmt: skip
        adapter = out / f"lora{i}"
        get_peft_model(AutoModelForCausalLM.from_pretrained(ref), lora).save_pretrained(adapter)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ref), adapter)
        model.merge_and_unload().save_pretrained(out / f"merged{i}")
        for f in Path(ref).glob("tokenizer*"):
            shutil.copy(f, out / f"merged{i}" / f.name)
        adapted[f"e{i}"] = {"adapter": str(adapter), "of": "ref"}
        merged[f"e{i}"] = {"path": str(out / f"merged{i}")}
    experts = [f"e{i}" for i in range(adapters)]
    paths = []
    for name, models in (("adapters", adapted), ("merged", merged)):
        body = {"name": name, "models": models, "base": "base", "reference": "ref",
                "experts": experts}  # fmt: skip
        (out / f"{name}.yaml").write_text(yaml.safe_dump(body))
        paths.append(out / f"{name}.yaml")
    return paths[0], paths[1]


def compare(
    config_path: Path, adapters: int = 2, rank: int = 16, max_tokens: int = 24, rounds: int = 3
) -> dict:
    """Median decode-step seconds of both families at batch 1 and 16, and the median forward
    seconds of the reference and the experts alone (what adapters change; the base's forward
    is the same in both and, on a shared machine, noisier than the difference)."""
    with tempfile.TemporaryDirectory(prefix="eft-adapter-bench-") as tmp:
        paths = write_families(Path(config_path), Path(tmp), adapters, rank)
        families = [load_family(p, device="cpu", dtype="float32") for p in paths]
        knobs = {f"e{i}": 1.0 / adapters for i in range(adapters)}
        prompts = [families[0].tokenizer.encode(f"request {i}: the river city") for i in range(16)]
        steps: list[dict[int, list[float]]] = [{1: [], 16: []}, {1: [], 16: []}]
        small: list[dict[int, list[float]]] = [{1: [], 16: []}, {1: [], 16: []}]
        for _ in range(rounds):  # alternate, so a burst of load hits both alike
            for fam, st, sm in zip(families, steps, small):

                def observe(s: StepStats, sm: dict = sm) -> None:
                    if s.batch_size in sm and not s.prompt_tokens:
                        sm[s.batch_size].append(
                            sum(v for m, v in s.forward_seconds.items() if m != "base")
                        )

                for b, sec in decode_step_seconds(
                    fam, knobs, prompts, max_tokens, rounds=1, also=observe
                ).items():
                    st[b].append(sec)
        del families
        gc.collect()
    step = [{b: statistics.median(v) for b, v in t.items()} for t in steps]
    fwd = [{b: statistics.median(v) for b, v in t.items()} for t in small]
    return {
        "adapters": adapters,
        "rank": rank,
        "step_seconds_adapters": step[0],
        "step_seconds_merged": step[1],
        "small_forward_seconds_adapters": fwd[0],
        "small_forward_seconds_merged": fwd[1],
        "ratio_b1": step[1][1] / step[0][1],
        "ratio_b16": step[1][16] / step[0][16],
        "forward_ratio_b1": fwd[1][1] / fwd[0][1],
        "forward_ratio_b16": fwd[1][16] / fwd[0][16],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.adapter_bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--config",
        default=str(DEMO),
        help="family YAML whose base and reference are used (default: the demo family)",
    )
    ap.add_argument("--adapters", type=int, default=2, help="LoRA experts (default 2)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens per row (default 24)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = compare(Path(args.config), args.adapters, args.rank, args.max_tokens, args.rounds)
    print(f"command: python -m loadtest.adapter_bench {' '.join(sys.argv[1:])}".rstrip())
    print(f"family: {args.config}; {args.adapters} LoRA experts of rank {args.rank} over its "
          f"reference; torch threads {torch.get_num_threads()}")  # fmt: skip
    for b in (1, 16):
        a, m = res["step_seconds_adapters"][b], res["step_seconds_merged"][b]
        print(f"  batch {b:>2} step:  adapters {1e3 * a:7.2f} ms   merged models {1e3 * m:7.2f} "
              f"ms   ratio {m / a:5.2f}x")  # fmt: skip
        a, m = res["small_forward_seconds_adapters"][b], res["small_forward_seconds_merged"][b]
        print(f"  batch {b:>2} reference + experts forwards: adapters {1e3 * a:7.2f} ms   merged "
              f"models {1e3 * m:7.2f} ms   ratio {m / a:5.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
