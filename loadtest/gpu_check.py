"""One script to run on a CUDA machine: does the paged-KV engine work there, and how fast is it.

    python -m loadtest.gpu_check [--json OUT] [--smoke] [--layers-base N] [--steps K]

A random-weight family with real shapes, in bfloat16 on the GPU: the base has Llama-3.1-8B's
shapes, the reference and the expert Llama-3.2-1B's (random weights cost what real ones cost
per token, and need no download). Each model gets its own `decoding.runner.ModelRunner` and
KV pool, exactly as the engine builds them. The script then:

1. runs each runner's `self_check` (paged forward == the model's own forward) and records
   which attention path it chose (`varlen` kernel or the `exact` gathered-blocks path);
2. generates greedy EFT tokens (w = 1: lp_base + lp_expert - lp_reference) for a few prompts;
3. times decode steps at batch 1, 16 and 64 after ~128-token prompts: each model alone, and
   the EFT step (three forwards, the combination, the argmax); tokens/s and EFT / base-alone;
4. counts the host-device synchronisations of one decode step (`set_sync_debug_mode`);
5. puts batch-1 decode against the device's memory bandwidth: a decode step has to read every
   weight once and the KV it attends to, so bytes / step time / bandwidth is how close to the
   hardware limit the step runs;
6. captures each runner's decode steps in CUDA graphs (`ModelRunner.enable_graphs`, checked
   against eager decode), generates the same greedy tokens from the replays
   (`graphs_equal_eager`) and times the steps again (`eft_graphs_over_eager`: > 1 is faster).

It prints one JSON object (and writes it to `--json`), and stays under 8 minutes on one H100:
batch sizes left when the time budget runs out are reported as null with a note.

`--smoke` runs the same code on tiny float32 models (on the CPU when there is no GPU) in
seconds, so that the script itself is tested where no GPU is (tests/test_gpu_check.py); the
sync and bandwidth parts need CUDA and are null there.

Imports only torch, transformers and the engine's runner modules: the check must run on a
bare CUDA box with neither the server's dependencies nor a family file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from types import SimpleNamespace

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from decoding.loading import LoadedModel
from decoding.runner import ModelRunner

# The shapes of the models the check stands in for (their config.json, without rope scaling,
# which changes no cost).
BASE_SHAPE = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip
SMALL_SHAPE = dict(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=8192, vocab_size=128256, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=True,
)  # fmt: skip
SMOKE_BASE = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=512, max_position_embeddings=4096,
    tie_word_embeddings=False,
)  # fmt: skip
SMOKE_SMALL = dict(SMOKE_BASE, hidden_size=32, intermediate_size=64, tie_word_embeddings=True)

# Same floor as the engine's composition: a token the reference rules out (-inf) would become
# +inf after `- lp_reference`.
LP_FLOOR = -1e4
EXPERT_WEIGHT = 1.0
BLOCK_SIZE = 16
TIME_BUDGET_S = 420.0  # the timed part stops starting new batch sizes after this (limit: 8 min)

# Peak memory bandwidth (bytes/s) by device name, from the vendors' data sheets; checked in
# order, so the more specific names come first. Anything else is measured.
BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100 80GB PCIe", 1.94e12),
    ("A100-SXM4-80GB", 2.04e12),
    ("A100", 2.0e12),
]


# ---------------------------------------------------------------------------- the family


def params_of(shape: dict) -> int:
    """Parameter count of a Llama with these shapes (to plan memory before building it)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    heads = 1 if shape["tie_word_embeddings"] else 2
    return heads * v * h + shape["num_hidden_layers"] * layer + h


def kv_bytes_per_token_layer(shape: dict, elem: int) -> int:
    hd = shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_key_value_heads"] * hd * elem


def plan_base_layers(free: int, pool_tokens: int, elem: int) -> int:
    """How many of the base's 32 layers fit next to the two small models and every KV pool,
    with room left for a step's activations and the allocator's slack."""
    margin = 8 << 30
    small = params_of(SMALL_SHAPE) * elem + pool_tokens * SMALL_SHAPE[
        "num_hidden_layers"
    ] * kv_bytes_per_token_layer(SMALL_SHAPE, elem)
    no_layers = params_of(dict(BASE_SHAPE, num_hidden_layers=0)) * elem
    per_layer = (params_of(dict(BASE_SHAPE, num_hidden_layers=1)) - params_of(
        dict(BASE_SHAPE, num_hidden_layers=0)
    )) * elem + pool_tokens * kv_bytes_per_token_layer(BASE_SHAPE, elem)  # fmt: skip
    room = free - margin - 2 * small - no_layers
    return max(0, min(BASE_SHAPE["num_hidden_layers"], room // per_layer))


def build(name: str, shape: dict, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A random-weight Llama, built directly on `device` (no host copy of 16 GB)."""
    cfg = LlamaConfig(**shape)
    with torch.device(device):
        module = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    module.requires_grad_(False)
    n = sum(p.numel() for p in module.parameters())  # tied weights counted once
    tok = SimpleNamespace(pad_token_id=0)  # the runner reads no tokenizer
    return LoadedModel(
        name, module, tok, device, device, dtype, n, shape["max_position_embeddings"], "plain"
    )


def weight_bytes(model: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.module.parameters())


# ---------------------------------------------------------------------------- EFT


def log_probs(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The engine's log-probs: fp32 log-softmax over the shared vocabulary, floored."""
    return torch.log_softmax(logits[..., :vocab].float(), dim=-1).clamp_min_(LP_FLOOR)


def eft_next(lb, lr, le, vocab: int) -> torch.Tensor:
    """Greedy EFT token of each row: argmax of the renormalised lp_base + w (lp_exp - lp_ref)
    (the renormalisation changes no argmax but is part of the engine's step, so is timed)."""
    scores = log_probs(lb, vocab) + EXPERT_WEIGHT * (log_probs(le, vocab) - log_probs(lr, vocab))
    return torch.log_softmax(scores, dim=-1).argmax(-1)


class Family:
    """The three runners, and one row of each per sequence (EFT runs every model per row)."""

    def __init__(self, base: ModelRunner, reference: ModelRunner, expert: ModelRunner, vocab):
        self.runners = {"base": base, "reference": reference, "expert": expert}
        self.vocab = vocab

    def open(self, prompts: list[list[int]], group: int) -> tuple[dict, torch.Tensor]:
        """Prefill `prompts` in every runner (`group` rows per forward, bounding activation
        memory); handles per runner and the first greedy EFT tokens."""
        handles = {k: [r.allocate() for _ in prompts] for k, r in self.runners.items()}
        firsts = []
        for s in range(0, len(prompts), group):
            part = prompts[s : s + group]
            logits = {
                k: r.prefill(handles[k][s : s + group], part) for k, r in self.runners.items()
            }
            firsts.append(eft_next(logits["base"], logits["reference"], logits["expert"],
                                   self.vocab))  # fmt: skip
        return handles, torch.cat(firsts)

    def close(self, handles: dict) -> None:
        for k, r in self.runners.items():
            for h in handles[k]:
                r.free(h)

    def eft_step(self, handles: dict, tokens: torch.Tensor) -> torch.Tensor:
        """One EFT decode step: the three forwards, the combination, the argmax. The tokens
        stay on the device (the engine reads them to the host once per step, after this)."""
        lb = self.runners["base"].decode(handles["base"], tokens)
        lr = self.runners["reference"].decode(handles["reference"], tokens)
        le = self.runners["expert"].decode(handles["expert"], tokens)
        return eft_next(lb, lr, le, self.vocab)

    def alone_step(self, key: str, handles: dict, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of one model served alone (greedy)."""
        return self.runners[key].decode(handles[key], tokens)[:, : self.vocab].argmax(-1)


# ---------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, tokens: torch.Tensor, steps: int, warmup: int, device) -> float:
    """Seconds per step of `steps` chained steps (each feeds its tokens to the next), after
    `warmup` untimed ones; synchronised before and after the timed loop only, so the host
    may run ahead of the device as the engine's loop does."""
    for _ in range(warmup):
        tokens = step(tokens)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = step(tokens)
    sync(device)
    return (time.perf_counter() - t0) / steps


def measure_batch(
    fam: Family,
    prompts: list[list[int]],
    group: int,
    steps: int,
    warmup: int,
    device: torch.device,
    sync_steps: int = 0,
) -> tuple[dict[str, float], tuple, tuple]:
    """Decode step times (ms) at batch len(prompts): each model alone (the base's is also
    the base-alone figure), then the EFT step, over the same rows; the tokens each runner
    held after the base-alone and the EFT loops (for the bytes a step reads), and with
    `sync_steps`, the syncs of that many EFT steps and base-alone steps."""
    handles, tok = fam.open(prompts, group)
    try:
        ms = {}
        # The small models' rows advance by fewer tokens than the base's; at ~128 tokens of
        # context the difference in KV read is a fraction of a percent of the weights.
        for key in fam.runners:
            ms[key] = 1e3 * time_steps(
                lambda t, key=key: fam.alone_step(key, handles, t), tok, steps, warmup, device
            )
        base_tokens = fam.runners["base"].num_tokens()
        ms["eft_total"] = 1e3 * time_steps(
            lambda t: fam.eft_step(handles, t), tok, steps, warmup, device
        )
        eft_tokens = {k: r.num_tokens() for k, r in fam.runners.items()}
        syncs = (None, None)
        if sync_steps:
            syncs = (
                count_syncs(lambda t: fam.eft_step(handles, t), tok, sync_steps, device),
                count_syncs(lambda t: fam.alone_step("base", handles, t), tok, sync_steps, device),
            )
        return ms, (base_tokens, eft_tokens), syncs
    finally:
        fam.close(handles)


def count_syncs(step, tokens: torch.Tensor, steps: int, device: torch.device) -> list[int]:
    """Host-device synchronisations in each of `steps` chained steps: CUDA's sync debug mode
    warns at each. Several steps, because a step whose row crosses into a new KV block does
    more host work (zeroing the fresh block) than the others."""
    counts = []
    for _ in range(steps):
        sync(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tokens = step(tokens)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        sync(device)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    return counts


def measure_bandwidth(device: torch.device) -> float:
    """Device-to-device copy rate of a 1 GiB buffer (bytes read + written per second): a
    floor on the peak, for a device the table lacks."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    rate = 2 * n * reps / (time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return rate


def assumed_bandwidth(device: torch.device) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device)
    for key, rate in BANDWIDTH:
        if key in name:
            return rate, f"data sheet ({key})"
    return measure_bandwidth(device), "measured (1 GiB device-to-device copy)"


@torch.inference_mode()
def full_forward_greedy(models: dict, prompts: list[list[int]], n: int, vocab: int):
    """The same greedy EFT tokens from each model's own forward over the whole sequence (its
    own attention, no KV cache, one row at a time): what the paged runners must reproduce."""
    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(n):
            logits = {}
            for k, m in models.items():
                x = torch.tensor([ids], device=m.input_device)
                logits[k] = m.module(input_ids=x, use_cache=False).logits[:, -1]
            ids.append(int(eft_next(logits["base"], logits["reference"], logits["expert"], vocab)))
        out.append(ids[len(prompt) :])
    return out


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bandwidth_report(
    rate: float, source: str, fam: Family, base_tokens: int, eft_tokens: dict, ms: dict
) -> dict:
    """Batch-1 decode against the memory-bandwidth limit: a step reads every weight of the
    models it runs once, and the KV its rows hold; bytes / step time / bandwidth is the
    fraction of the limit reached. Tokens are those held at the end of each timed loop (the
    mean over the loop is steps / 2 fewer: KiB against gigabytes of weights)."""
    r = fam.runners
    base_bytes = weight_bytes(r["base"].model) + base_tokens * r["base"].block_bytes_per_token
    eft_bytes = sum(
        weight_bytes(r[k].model) + eft_tokens[k] * r[k].block_bytes_per_token for k in r
    )
    return {
        "assumed_bytes_per_s": rate,
        "source": source,
        "base_alone_bytes_per_step": base_bytes,
        "eft_bytes_per_step": eft_bytes,
        "base_alone_fraction_b1": round(base_bytes / (ms["base"] / 1e3) / rate, 4),
        "eft_fraction_b1": round(eft_bytes / (ms["eft_total"] / 1e3) / rate, 4),
        # An upper bound on what is read: the untied base's input embedding table counts
        # whole, though a step reads one row of it (~1 GB of the 8B's 16 GB).
        "note": "bytes = every parameter once + KV held by the rows; the base's input "
        "embedding table counts whole (a step reads one row of it)",
    }


def greedy_eft(fam: Family, prompts: list[list[int]], group: int, n: int) -> list[list[int]]:
    """`n` greedy EFT tokens of each prompt, decoded as one batch."""
    handles, tok = fam.open(prompts, group)
    out = [tok]
    for _ in range(n - 1):
        tok = fam.eft_step(handles, tok)
        out.append(tok)
    fam.close(handles)
    return torch.stack(out, 1).tolist()  # one host read for the whole generation


def enable_graphs(fam: Family, max_batch: int, max_len: int, capture: bool) -> dict:
    """Each runner's decode graphs (`ModelRunner.enable_graphs`, which checks a replay against
    its eager decode): {runner: None when on, else why not}."""
    return {k: r.enable_graphs(max_batch, max_len, capture) for k, r in fam.runners.items()}


# ---------------------------------------------------------------------------- the check


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.gpu_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--smoke", action="store_true", help="tiny float32 models, seconds, any device")
    p.add_argument("--layers-base", type=int, help="base layers (default: 32, or what fits)")
    p.add_argument("--steps", type=int, help="timed decode steps per measurement")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    notes: list[str] = []

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        dtype, base_shape, small_shape = torch.float32, dict(SMOKE_BASE), dict(SMOKE_SMALL)
        batches, steps, warmup, prompt_len, gen_len, group = (1, 4), 4, 1, 16, 8, 4
        pool_rows, pool_ctx = 4, 128
        if not cuda:
            torch.set_num_threads(1)  # a shared CPU; the tiny models gain nothing from more
    else:
        if not cuda:
            raise SystemExit("gpu_check needs a CUDA device (or --smoke)")
        dtype, base_shape, small_shape = torch.bfloat16, dict(BASE_SHAPE), dict(SMALL_SHAPE)
        batches, steps, warmup, prompt_len, gen_len, group = (1, 16, 64), 32, 3, 128, 32, 16
        # A serving-sized pool: 64 rows of 1024 tokens per model.
        pool_rows, pool_ctx = 64, 1024
    steps = args.steps or steps
    # Each row's longest context: its prompt, then up to two timed phases (a model alone,
    # then EFT) of warmup + steps, and the sync-count steps (a block's worth, twice).
    need_ctx = prompt_len + 2 * (warmup + steps) + 2 * BLOCK_SIZE + 1
    pool_ctx = max(pool_ctx, need_ctx)
    for shape in (base_shape, small_shape):
        shape["max_position_embeddings"] = max(shape["max_position_embeddings"], pool_ctx)

    elem = torch.empty((), dtype=dtype).element_size()
    if args.layers_base is not None:
        base_shape["num_hidden_layers"] = args.layers_base
        notes.append(f"base layers set by --layers-base to {args.layers_base}")
    elif not args.smoke:
        free, _ = torch.cuda.mem_get_info(device)
        fit = plan_base_layers(free, pool_rows * pool_ctx, elem)
        if fit < 1:
            raise SystemExit(f"not even one base layer fits in {free / 2**30:.1f} GiB free")
        if fit < base_shape["num_hidden_layers"]:
            notes.append(
                f"only {fit} of the base's 32 layers fit in {free / 2**30:.1f} GiB free next to "
                "the small models and the KV pools: base step times are below an 8B's"
            )
            base_shape["num_hidden_layers"] = fit

    torch.manual_seed(0)
    models = {
        "base": build("base", base_shape, dtype, device),
        "reference": build("reference", small_shape, dtype, device),
        "expert": build("expert", small_shape, dtype, device),
    }
    vocab = min(m.module.config.vocab_size for m in models.values())
    runners = {k: ModelRunner(m) for k, m in models.items()}
    blocks = pool_rows * math.ceil(pool_ctx / BLOCK_SIZE) + 1  # + the null block
    for r in runners.values():
        # No prefix caching: timed decode steps write tokens whose ids stay on the device,
        # which a prefix key could not name.
        r.allocate_pool(blocks, BLOCK_SIZE, prefix_caching=False)
    for r in runners.values():
        r.self_check()  # falls back from varlen to exact if the kernel disagrees
    backends = {k: ("varlen" if r.use_varlen else "exact") for k, r in runners.items()}
    backend = backends["base"] if len(set(backends.values())) == 1 else backends
    fam = Family(runners["base"], runners["reference"], runners["expert"], vocab)
    gen = torch.Generator().manual_seed(1)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [torch.randint(1, vocab, (length,), generator=gen).tolist() for _ in range(n)]

    # 2. Greedy EFT generation, eager, batched (prompts of different lengths share steps).
    lens = [max(2, prompt_len // 4), prompt_len // 2, prompt_len]
    greedy_prompts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lens]
    greedy = greedy_eft(fam, greedy_prompts, group, gen_len)
    # Paged, batched decode against each model's own full forward: equal in float32; in
    # bfloat16 a near-tie between random-weight logits may flip one token, and every token
    # after it differs, so this reports how far each prompt agrees rather than failing.
    full = full_forward_greedy(models, greedy_prompts, gen_len, vocab)
    agree = [matching_prefix(a, b) for a, b in zip(greedy, full)]

    # 3.-6. Timed decode at each batch size.
    step_ms: dict[str, dict[str, float] | None] = {}
    tps_base: dict[str, float | None] = {}
    tps_eft: dict[str, float | None] = {}
    syncs = syncs_base = None
    sync_steps = BLOCK_SIZE  # one step in a block's worth crosses a block boundary
    bandwidth: dict = {"assumed_bytes_per_s": None, "base_alone_fraction_b1": None,
                       "eft_fraction_b1": None}  # fmt: skip
    for b in batches:
        if time.perf_counter() - t_start > TIME_BUDGET_S:
            notes.append(f"batch {b} skipped: past the {TIME_BUDGET_S:.0f} s time budget")
            step_ms[str(b)] = tps_base[str(b)] = tps_eft[str(b)] = None
            continue
        ms, held, syncs_b = measure_batch(
            fam, prompts(b, prompt_len), group, steps, warmup, device,
            sync_steps=sync_steps if b == 1 and cuda else 0,
        )  # fmt: skip
        if b == 1:
            base_tokens, eft_tokens = held
            syncs, syncs_base = syncs_b
        step_ms[str(b)] = {k: round(v, 3) for k, v in ms.items()}
        tps_base[str(b)] = round(b * 1e3 / ms["base"], 2)
        tps_eft[str(b)] = round(b * 1e3 / ms["eft_total"], 2)
        if b == 1 and cuda:
            rate, source = assumed_bandwidth(device)
            bandwidth = bandwidth_report(rate, source, fam, base_tokens, eft_tokens, ms)
    # 7. The same decode replayed from CUDA graphs (without CUDA: the same buffers, eagerly).
    graphs = enable_graphs(fam, max(batches), pool_ctx, capture=cuda)
    graphs_on = all(why is None for why in graphs.values())
    graphs_equal = greedy_eft(fam, greedy_prompts, group, gen_len) == greedy if graphs_on else None
    step_ms_graphs: dict[str, dict[str, float] | None] = {}
    syncs_graphs = None
    for b in batches if graphs_on else ():
        if time.perf_counter() - t_start > TIME_BUDGET_S:
            notes.append(f"graphs at batch {b} skipped: past the {TIME_BUDGET_S:.0f} s budget")
            step_ms_graphs[str(b)] = None
            continue
        ms, _, syncs_b = measure_batch(
            fam, prompts(b, prompt_len), group, steps, warmup, device,
            sync_steps=sync_steps if b == 1 and cuda else 0,
        )  # fmt: skip
        step_ms_graphs[str(b)] = {k: round(v, 3) for k, v in ms.items()}
        if b == 1:
            syncs_graphs = syncs_b[0]
    if not cuda:
        notes.append("no CUDA: syncs_per_step and bandwidth not measured; graphs not captured")

    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "smoke": args.smoke,
        "base_layers": base_shape["num_hidden_layers"],
        "note": "; ".join(notes) or None,
        "params": {k: m.num_params for k, m in models.items()},
        "attention_backend": backend,
        # Per runner: None where decode graphs are on, else why not (see enable_graphs).
        "cuda_graphs": graphs if cuda else "not captured (no CUDA): buffers replayed eagerly",
        "graphs_equal_eager": graphs_equal,
        "step_ms_by_batch_graphs": step_ms_graphs,
        "eft_graphs_over_eager": {
            b: round(step_ms[b]["eft_total"] / g["eft_total"], 4)
            for b, g in step_ms_graphs.items()
            if g and step_ms.get(b)
        },
        "syncs_per_step_graphs": sum(syncs_graphs) / len(syncs_graphs) if syncs_graphs else None,
        "greedy_tokens": greedy,
        # Per prompt: how many leading greedy tokens equal the models' own full forward's.
        "greedy_full_forward_agree": agree,
        "greedy_full_forward_equal": agree == [gen_len] * len(greedy),
        "steps": steps,
        "prompt_tokens": prompt_len,
        "step_ms": step_ms.get("1"),
        "step_ms_by_batch": step_ms,
        "tokens_per_s": {"base_alone": tps_base, "eft": tps_eft},
        "eft_over_base": {
            b: (round(tps_eft[b] / tps_base[b], 4) if tps_eft[b] and tps_base[b] else None)
            for b in tps_base
        },
        # Mean over a block's worth of steps, and each step's count (EFT, batch 1).
        "syncs_per_step": sum(syncs) / len(syncs) if syncs else None,
        "syncs_each_step": syncs,
        "syncs_per_step_base_alone": sum(syncs_base) / len(syncs_base) if syncs_base else None,
        "bandwidth": bandwidth,
        "elapsed_s": round(time.perf_counter() - t_start, 2),
    }
    text = json.dumps(result)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
