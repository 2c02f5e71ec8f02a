"""How many KV blocks each runner's pool gets, from one memory budget.

Every row of an EFT request uses a base, a reference and its experts at once, so the pools
are sized to hold the same number of tokens per family entry: a runner with k members (a
model and its adapters, each with its own KV) gets k times the blocks of a runner with one.
The budget is `kv_cache_memory` when given; else, on CUDA, `gpu_memory_utilization` of the
device less what is already allocated (the weights) and room for one step's activations
(vLLM's meaning of the flag); on a CPU, what `max_batch_size` rows at the context limit could
need, at most a quarter of the machine's memory (pages are only touched as blocks are used).
"""

from __future__ import annotations

import logging
import os

import torch

from .config import EngineConfig
from .runner import ModelRunner

log = logging.getLogger(__name__)

CPU_SHARE = 0.25  # of physical memory, at most, for a CPU server's default pools


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def kv_budget(
    groups: list[tuple[ModelRunner, list[str]]], config: EngineConfig, context: int, vocab: int
) -> int:
    """Bytes for every pool together."""
    if config.kv_cache_memory is not None:
        return int(config.kv_cache_memory)
    per_token = sum(len(names) * r.block_bytes_per_token for r, names in groups)
    device = groups[0][0].device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        in_use = total - free
        # One step's activations: the logits of a full token budget in fp32 (twice: log-probs)
        # dominate for large vocabularies; the rest is a margin for the kernels' workspaces.
        activations = 2 * config.max_num_batched_tokens * vocab * 4 + (512 << 20)
        budget = int(config.gpu_memory_utilization * total) - in_use - activations
        if budget <= 0:
            raise ValueError(
                f"no GPU memory left for the KV cache: {in_use / 2**30:.1f} GiB in use of "
                f"{total / 2**30:.1f} GiB at --gpu-memory-utilization "
                f"{config.gpu_memory_utilization}; raise it or give --kv-cache-memory"
            )
        return budget
    want = config.max_batch_size * context * per_token
    return int(min(want, CPU_SHARE * physical_memory()))


def size_pools(
    groups: list[tuple[ModelRunner, list[str]]], config: EngineConfig, context: int, vocab: int
) -> None:
    """Allocate every runner's pool from the budget (equal tokens per family entry)."""
    budget = kv_budget(groups, config, context, vocab)
    bs = config.block_size
    per_block = sum(len(names) * r.block_bytes_per_token * bs for r, names in groups)
    blocks = budget // per_block
    if blocks < 1:
        raise ValueError(
            f"--kv-cache-memory {budget} bytes holds no KV block: one block of {bs} tokens "
            f"in every model takes {per_block} bytes"
        )
    for runner, names in groups:
        runner.allocate_pool(len(names) * blocks + 1, bs, config.prefix_caching)
    copies = sum(r.decode_kv.limit for r, _ in groups if r.decode_kv is not None)
    log.info(
        "KV cache: %.1f MiB, %d tokens per model in blocks of %d%s%s; attention: %s",
        sum(r.capacity_bytes() for r, _ in groups) / 2**20,
        blocks * bs,
        bs,
        ", prefix caching" if config.prefix_caching else "",
        f" (+ up to {copies / 2**20:.1f} MiB for a CPU decode copy)" if copies else "",
        "varlen paged kernel" if groups[0][0].use_varlen else "exact (gathered blocks, SDPA)",
    )
