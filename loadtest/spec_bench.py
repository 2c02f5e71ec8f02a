"""Speculative EFT vs plain decoding on the same engine, side by side (no HTTP).

    python -m loadtest.spec_bench [--config FAMILY.yaml] [--questions 24] [--max-tokens 48]
                                  [--device cuda --dtype bfloat16] [--base-layers N]

On the demo family (default), chat prompts from its eval set, up-scaling knobs
(`helpful` 1, the family's default filter):
- batch 1, one request at a time: output tokens/s with `--speculative K` (block up to K) and
  with `off`, greedy and at temperature 1; greedy outputs must be identical;
- 16 concurrent, greedy, every answer `max_tokens` long: `auto` against `off` (auto speculates
  only where it measures faster).
Each comparison runs on one engine, its plain side being the same requests opted out of
speculation (`"speculative": false`), and alternates the two sides question by question at
batch 1 and run by run at 16 concurrent, so a machine that slows down for a while slows both
(`auto` keeps what it measured from one run to the next, as a server does). Prints the ratios,
the acceptance rate (accepted / drafted tokens) and the command. Where the time goes, from the
engine's own step statistics: `forward_ratio`, the models' forward seconds per token of the
decode steps without / with speculation (the ratio if nothing but forwards cost time), and
`prefill_share`, the part of the plain run spent in steps that prefill prompts (the same with
speculation, so it caps the end-to-end ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from decoding.composition import make_composition
from decoding.engine import Engine, EngineConfig
from decoding.family import load_family
from decoding.request import GenerationRequest, SamplingParams, StepStats

DEMO = Path(__file__).resolve().parent.parent / "demo" / "family" / "family.yaml"


class Counts:
    def __init__(self) -> None:
        self.drafted = self.accepted = self.generated = 0
        self.decode_forward = self.decode_tokens = 0.0  # steps that only decode
        self.prefill_seconds = self.seconds = 0.0

    def __call__(self, s: StepStats) -> None:
        self.generated += s.generated_tokens
        self.drafted += s.spec_draft_tokens
        self.accepted += s.spec_accepted_tokens
        self.seconds += s.step_seconds
        if s.prompt_tokens:
            self.prefill_seconds += s.step_seconds
        else:
            self.decode_forward += sum(s.forward_seconds.values())
            self.decode_tokens += s.generated_tokens

    def forward_per_token(self) -> float:
        return self.decode_forward / max(self.decode_tokens, 1)


async def _compare(family, spec_mode: str, prompts, max_tokens: int, temperature: float,
                   concurrent: bool, reps: int, ignore_eos: bool = False):  # fmt: skip
    """One engine (`--speculative spec_mode`); the plain runs are the same requests opted out
    of speculation, so both sides run the same code but for speculation itself. Runs
    alternate (question by question at batch 1, run by run at 16 concurrent), so a machine
    that slows down for a while slows both."""
    counts = {"off": Counts(), "spec": Counts(), "warm-up": Counts()}
    current = ["warm-up"]  # whose steps the engine is running now
    config = EngineConfig(speculative=spec_mode, max_batch_size=32)
    engine = Engine(family, config, on_step=lambda s: counts[current[0]](s))
    engine.start()
    comp = make_composition(family, None, {"helpful": 1.0})

    async def one(rid: str, messages, speculative: bool) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                speculative=speculative, ignore_eos=ignore_eos)  # fmt: skip
        req = GenerationRequest(rid, family.render_chat(messages), comp, params)
        out: list[int] = []
        async for ev in engine.submit(req):
            out += ev.token_ids
        return out

    seconds = {"off": 0.0, "spec": 0.0}
    outs: dict[str, list] = {"off": [], "spec": []}

    async def timed(key: str, job):
        current[0] = key
        t0 = time.perf_counter()
        out = await job
        seconds[key] += time.perf_counter() - t0
        current[0] = "warm-up"
        return out

    def order(n: int) -> tuple[str, str]:
        return ("off", "spec") if n % 2 == 0 else ("spec", "off")

    try:
        for speculative in (False, True):
            await one("warm-up", prompts[0], speculative)
        for r in range(reps):
            if concurrent:
                for key in order(r):
                    jobs = [one(f"{key}{r}-{i}", m, key == "spec") for i, m in enumerate(prompts)]
                    outs[key] = await timed(key, asyncio.gather(*jobs))
            else:
                outs = {"off": [], "spec": []}
                for i, m in enumerate(prompts):
                    for key in order(i + r):
                        outs[key].append(await timed(key, one(f"{key}{r}-{i}", m, key == "spec")))
    finally:
        await engine.shutdown()
    return outs, seconds, counts


def compare(
    family,
    prompts,
    spec_mode: str,
    temperature: float,
    concurrent: bool,
    max_tokens: int,
    reps: int = 2,
    ignore_eos: bool = False,
) -> dict:
    """Output tokens/s with speculation (`spec_mode`) against without, over `reps` rounds of
    alternating runs. Greedy runs also say whether the outputs were identical."""
    outs, seconds, counts = asyncio.run(_compare(
        family, spec_mode, prompts, max_tokens, temperature, concurrent, reps, ignore_eos
    ))  # fmt: skip
    spec, off = counts["spec"], counts["off"]
    tok_s = {
        key: (off if key == "off" else spec).generated / max(seconds[key], 1e-12)
        for key in ("off", "spec")
    }
    res = {
        "off_tok_s": tok_s["off"],
        "spec_tok_s": tok_s["spec"],
        "ratio": tok_s["spec"] / tok_s["off"] if tok_s["off"] else 0.0,
        "acceptance": spec.accepted / spec.drafted if spec.drafted else 0.0,
        "drafted_tokens": {"spec": spec.drafted, "off": off.drafted},
        "forward_ratio": off.forward_per_token() / max(spec.forward_per_token(), 1e-12),
        "prefill_share": off.prefill_seconds / max(off.seconds, 1e-12),
    }
    if temperature == 0:
        res["identical_greedy_output"] = outs["off"] == outs["spec"]
    return res


def compare_all(family, prompts, block: str, max_tokens: int, reps: int = 2) -> dict:
    """Batch 1 (greedy and temperature 1, blocks of up to `block`) and 16 concurrent (auto).
    The 16-concurrent runs are greedy, so both sides generate the same tokens (sampled answers
    differ in length between the sides, and the longest one, decoding alone at the end, moved
    the ratio by 20%), and each answer runs to `max_tokens` (`ignore_eos`, as vLLM's serving
    benchmark does): with the eval set's short answers they were 70% prefill, the same work on
    both sides, and measured the machine's noise more than `auto`'s decisions. A run lasts
    about a second, so it gets 4x the rounds."""
    c16 = prompts[:16]
    return {
        "b1_greedy": compare(family, prompts, block, 0.0, False, max_tokens, reps),
        "b1_temperature_1": compare(family, prompts, block, 1.0, False, max_tokens, reps),
        "c16_auto_vs_off": compare(family, c16, "auto", 0.0, True, max_tokens, 4 * reps, True),
    }


def deepen_base(config: str | Path, layers: int, out_dir: Path) -> Path:
    """A copy of the family (a YAML in `out_dir`, the other models where they are) whose base
    has `layers` decoder layers: its own, then identity layers, whose attention and MLP output
    projections are zero, so each adds exactly nothing to the residual stream. The base
    computes the same function, its tokens and log-probs are unchanged, and a forward costs
    more: a cost ratio between the base and the small models like a real family's, with the
    demo's trained acceptance."""
    from transformers import AutoModelForCausalLM

    config = Path(config)
    cfg = yaml.safe_load(config.read_text())
    root = config.parent
    cfg["models"] = {
        name: {**spec, "path": str((root / spec["path"]).resolve())}
        for name, spec in cfg["models"].items()
    }
    src = Path(cfg["models"][cfg["base"]]["path"])
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    own = model.config.num_hidden_layers
    if layers <= own:
        raise SystemExit(f"--base-layers must exceed the base's own {own} layers")
    model.config.num_hidden_layers = layers
    deep = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    deep.load_state_dict(model.state_dict(), strict=False)  # embeddings, own layers, head
    with torch.no_grad():
        for layer in deep.model.layers[own:]:
            try:
                outputs = (layer.self_attn.o_proj, layer.mlp.down_proj)
            except AttributeError as exc:
                raise SystemExit(f"--base-layers needs a Llama-like base ({exc})") from exc
            for linear in outputs:
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
    target = out_dir / "deep-base"
    deep.save_pretrained(target)
    for f in src.iterdir():  # tokenizer and chat template
        if f.is_file() and not f.name.startswith(("model", "config", "generation_config")):
            shutil.copy(f, target / f.name)
    cfg["models"][cfg["base"]]["path"] = str(target)
    if (root / "eval_set.json").exists():
        shutil.copy(root / "eval_set.json", out_dir / "eval_set.json")
    path = out_dir / "family.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def eval_prompts(config: str | Path, n: int) -> list[list[dict]]:
    """The first `n` questions of the eval set next to a family YAML, as chat messages."""
    evalset = json.loads((Path(config).parent / "eval_set.json").read_text())
    return [[{"role": "user", "content": q["question"]}] for q in evalset["questions"][:n]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.spec_bench",
                                 description=__doc__.split("\n\n")[0])  # fmt: skip
    ap.add_argument("--config", default=str(DEMO), help="family YAML (default: the demo family)")
    ap.add_argument("--questions", type=int, default=24, help="eval-set questions to ask")
    ap.add_argument(
        "--max-tokens", type=int, default=48, help="output tokens per answer (default 48)"
    )
    ap.add_argument("--block", default="4", help="block length K for the batch-1 runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the family's)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="model dtype (default: the family's)")  # fmt: skip
    ap.add_argument("--base-layers", type=int, default=None, metavar="N",
                    help="pad the base to N layers with identity layers: the same outputs "
                    "at a higher cost per forward, as a large base costs against small "
                    "models")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"command: python -m loadtest.spec_bench {' '.join(argv or sys.argv[1:])}".rstrip())
    with tempfile.TemporaryDirectory(prefix="eft-spec-") as tmp:
        config = args.config
        if args.base_layers:
            config = deepen_base(config, args.base_layers, Path(tmp))
        family = load_family(config, device=args.device, dtype=args.dtype)
        prompts = eval_prompts(config, args.questions)
        res = compare_all(family, prompts, args.block, args.max_tokens)
    for key, r in res.items():
        same = r.get("identical_greedy_output")
        print(f"  {key:18s} off {r['off_tok_s']:7.1f} tok/s   speculative {r['spec_tok_s']:7.1f}"
              f" tok/s   ratio {r['ratio']:4.2f}x   acceptance {r['acceptance']:4.0%}"
              f"   forward-only {r['forward_ratio']:4.2f}x   prefill {r['prefill_share']:4.0%}"
              + ("" if same is None else f"   identical greedy output: {same}"))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
