"""HF's `DynamicCache` vs our `GrowableLayer` cache on the same decode loop, side by side.

    python -m loadtest.kv_bench [--batch 16] [--prompt 768] [--steps 48] [--repeats 2]

A random 8-layer Llama (d=512) prefills `--batch` prompts and decodes `--steps` tokens greedily
with each cache; prints both times, their ratio and the largest logit difference (0: the two
caches compute the same thing). `DynamicLayer.update` concatenates the whole cache every step;
`GrowableLayer` writes into spare capacity, so the gap grows with the context length.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from decoding.kvcache import new_cache


@torch.inference_mode()
def decode(model: LlamaForCausalLM, cache, ids: torch.Tensor, steps: int):
    batch, prompt = ids.shape
    mask = torch.ones(batch, prompt, dtype=torch.long)
    out = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    logits = []
    t0 = time.perf_counter()
    for i in range(steps):
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)
        pos = torch.full((batch, 1), prompt + i)
        out = model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        logits.append(out.logits[:, -1])
    return time.perf_counter() - t0, torch.stack(logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=768)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, max_position_embeddings=args.prompt + args.steps + 1,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt))
    print(f"command: python -m loadtest.kv_bench {' '.join(sys.argv[1:])}".rstrip())
    print(f"batch {args.batch}, prompt {args.prompt}, {args.steps} decode steps, "
          f"torch threads {torch.get_num_threads()}")
    for _ in range(args.repeats):
        t_hf, l_hf = decode(model, DynamicCache(), ids, args.steps)
        t_ours, l_ours = decode(model, new_cache(cfg), ids, args.steps)
        diff = (l_hf - l_ours).abs().max().item()
        print(f"  DynamicCache {t_hf:6.2f} s   GrowableLayer {t_ours:6.2f} s   "
              f"ratio {t_hf / t_ours:5.2f}x   max logit diff {diff:.1e}")


if __name__ == "__main__":
    main()
