"""The KV-slot runner under churn: decode step time when rows join and leave vs a steady batch.

    python -m loadtest.kv_bench [--batch 16] [--prompt 256] [--steps 48] [--repeats 2]

A random 8-layer Llama (d=512) runs through `decoding.runner.ModelRunner`, the engine's own
per-model runner. **steady**: `--batch` rows decode `--steps` tokens. **churn**: the same, but
every step one row leaves (its slot is freed) and a new row joins (a `--prompt`-token prefill
into the freed slot). Prints the mean decode-step time of each and their ratio, which is what
churn costs the rows that did not change (the first engine re-copied every row's cache on each
join and leave); the joining row's own prefill forward is timed separately.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decoding.family import LoadedModel
from decoding.runner import ModelRunner


def make_runner(prompt: int, steps: int, batch: int) -> ModelRunner:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4,
        max_position_embeddings=prompt + steps * (batch + 2),
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    tok = SimpleNamespace(pad_token_id=0)  # the runner only reads the pad id
    cpu = torch.device("cpu")
    loaded = LoadedModel("bench", model, tok, cpu, cpu, torch.float32, 0, 1 << 20, "plain")
    return ModelRunner(loaded, batch + 1)


@torch.inference_mode()
def run(runner: ModelRunner, batch: int, prompt: int, steps: int, churn: bool) -> dict:
    gen = torch.Generator().manual_seed(1)

    def new_prompt() -> list[int]:
        return torch.randint(1, 384, (prompt,), generator=gen).tolist()

    slots = [runner.allocate() for _ in range(batch)]
    logits = runner.prefill(slots, [new_prompt() for _ in slots])
    tokens = logits.argmax(-1)
    decode_s, prefill_s = [], []
    for step in range(steps):
        if churn:
            leaving = slots[step % batch]  # oldest-first, like requests finishing in turn
            runner.free(leaving)
            t0 = time.perf_counter()
            slot = runner.allocate()
            first = runner.prefill([slot], [new_prompt()])
            prefill_s.append(time.perf_counter() - t0)
            slots[step % batch] = slot
            tokens[step % batch] = first[0].argmax()
        t0 = time.perf_counter()
        tokens = runner.decode(slots, tokens).argmax(-1)
        decode_s.append(time.perf_counter() - t0)
    for s in slots:
        runner.free(s)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"decode_ms": 1e3 * mean(decode_s), "prefill_ms": 1e3 * mean(prefill_s)}


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.kv_bench", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--batch", type=int, default=16, help="rows decoding together (default 16)")
    ap.add_argument(
        "--prompt",
        type=int,
        default=256,
        help="prompt tokens of each row, and of each joining row (default 256)",
    )
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed per run (default 48)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="steady/churn pairs to run, one line each (default 2)",
    )
    args = ap.parse_args()
    runner = make_runner(args.prompt, args.steps, args.batch)
    print(f"command: python -m loadtest.kv_bench {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"batch {args.batch}, prompt {args.prompt}, {args.steps} decode steps, "
        f"torch threads {torch.get_num_threads()}"
    )
    for _ in range(args.repeats):
        steady = run(runner, args.batch, args.prompt, args.steps, churn=False)
        churn = run(runner, args.batch, args.prompt, args.steps, churn=True)
        ratio = churn["decode_ms"] / steady["decode_ms"]
        print(
            f"  decode step: steady {steady['decode_ms']:7.2f} ms   "
            f"churn {churn['decode_ms']:7.2f} ms   ratio {ratio:.2f}x"
            f"   (joining row's prefill {churn['prefill_ms']:.1f} ms)"
        )


if __name__ == "__main__":
    main()
