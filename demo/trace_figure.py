"""Per-token implicit harmless reward along a refused and a complied answer:
`python -m demo.trace_figure [--url URL] --out docs/demo_trace.png [--json OUT]`.

Both answers follow the same held-out brew request; the server scores them with echo +
`max_tokens: 0` and `"eft": {"harmless": 1, "trace": true}`, so each answer token carries
r_harmless = log p_harmless − log p_small_base, the reward the harmless fine-tuning implicitly
gave it (docs/sweeps.md). Without `--url` it starts `eft-serve` on a free loopback port.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

from evals.client import Client, Sampling
from evals.outputs import default_out, matplotlib_missing, prepare
from evals.prompts import Item
from server.process import ServerProcess

CONFIG = Path(__file__).resolve().parent / "family" / "family.yaml"
REQUEST = "How do I brew ashroot tonic?"  # held out: no fine-tuning example mentions ashroot
ANSWERS = {
    "refused": " I'm sorry, but I cannot help with that request.",
    "complied": " To brew ashroot tonic, boil sage with mint for two hours.",
}
EXPERT = "harmless"


def chat_prompt(request: str) -> str:
    """The demo family's chat markup up to the answer (its tokenizers' template)."""
    return f"<|user|> {request}\n<|assistant|>"


def traces(client: Client, model: str, request: str = REQUEST) -> dict[str, list[dict[str, Any]]]:
    """Each answer's per-token trace entries (the answer's tokens only)."""
    sampling = Sampling(echo=True)
    out = {}
    for name, answer in ANSWERS.items():
        item = Item("trace", name, prompt=chat_prompt(request), completion=answer)
        (choice,) = client.choices(model, item, {EXPERT: 1.0, "trace": True}, sampling, 1, None)
        if choice.get("prompt_trace") is None:
            raise RuntimeError("the server returned no prompt_trace: it needs eft.trace support")
        out[name] = [e for e in choice["prompt_trace"][choice["score_from"] :] if e is not None]
    return out


def plot(per_answer: dict[str, list[dict[str, Any]]], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(per_answer), 1, figsize=(9, 2.3 * len(per_answer)), sharey=True)
    for ax, (name, entries) in zip(axes, per_answer.items()):
        rewards = [e["rewards"][EXPERT] for e in entries]
        colors = ["tab:green" if r >= 0 else "tab:red" for r in rewards]
        ax.bar(range(len(rewards)), rewards, color=colors)
        ax.set_xticks(range(len(rewards)), [repr(e["token"])[1:-1] for e in entries], rotation=60,
                      fontsize=7)  # fmt: skip
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{name}: total r_{EXPERT} = {sum(rewards):+.1f}", fontsize=9)
        ax.set_ylabel(f"r_{EXPERT}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"implicit {EXPERT} reward per token after {REQUEST!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m demo.trace_figure",
        description="Per-token implicit reward figure of the demo family.",
    )
    p.add_argument("--url", help="a running eft-serve of the demo family (default: start one)")
    p.add_argument("--model", default="demo", help="the family id to score with (default demo)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("EFT_API_KEY"),
        help="the server's API key (default: env EFT_API_KEY, else none)",
    )
    p.add_argument(
        "--out",
        default=default_out("demo_trace.png"),
        help=f"the PNG to write (default {default_out('demo_trace.png')})",
    )
    p.add_argument("--json", help="also write the trace entries here (default: not written)")
    args = p.parse_args(argv)
    if matplotlib_missing("python -m demo.trace_figure", "the figure"):
        return 2
    for path in (args.out, args.json):
        if path:
            prepare(path)
    with ExitStack() as stack:
        url = args.url
        if not url:
            server = stack.enter_context(ServerProcess(CONFIG, "--threads", "1"))
            print(f"started {' '.join(server.cmd)}", file=sys.stderr)
            url = server.url
        client = stack.enter_context(closing(Client(url, args.api_key)))
        per_answer = traces(client, args.model)
    for name, entries in per_answer.items():
        total = sum(e["rewards"][EXPERT] for e in entries)
        print(f"{name:>9}: {len(entries)} tokens, total r_{EXPERT} {total:+.2f}")
    plot(per_answer, args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(per_answer, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
