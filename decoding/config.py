"""Engine settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_batch_size: int = 32  # rows decoding together (n siblings count separately); KV slots
    # Sequences (prompts x n) queued for admission; beyond it submit() refuses (429).
    max_waiting: int = 256
    # Sequences one request may bring (prompts x n): more is refused (400) at submit, so that no
    # single request can fill the queue and lock the other clients out.
    max_seqs_per_request: int = 64
    # Tokens one step may process: one per decoding row, the rest for prompt chunks
    # (vLLM's max_num_batched_tokens).
    max_num_batched_tokens: int = 512
    # While rows decode, a step may cap prompt tokens at prefill_share x (decoding rows) (at
    # least MIN_PREFILL_CHUNK): smoother streams, much later first tokens. 0 (the default)
    # leaves only the budget: with decode rows and prompt chunks in one forward this gave the
    # most goodput here (10.9 against 1.5 req/s at TTFT <= 250 ms and ITL <= 50 ms).
    prefill_share: float = 0.0
    seed: int = 0  # of the generator shared by unseeded requests
    idle_wait_s: float = 0.5  # how long the idle loop sleeps between checks for shutdown
    # Speculative EFT: "auto" (where it measures faster), "off", or "K" (always, blocks <= K).
    speculative: str = "auto"
    # Paged KV: every model's pool together gets `kv_cache_memory` bytes; None sizes it from
    # the device (CUDA: `gpu_memory_utilization` of its memory, less weights and activations;
    # CPU: what `max_batch_size` rows at the context limit could need, at most a quarter of
    # the machine's memory).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # share the KV of full blocks with an equal prefix
    # "on" | "off" | "auto" (off until the capture is verified on a GPU); see decoding/graphs.py
    cuda_graphs: str = "auto"
