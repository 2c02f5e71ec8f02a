"""Engine-side state of a request and of each of its running rows (sibling sequences)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from .detokenizer import IncrementalDetokenizer
from .kvcache import ModelBatch
from .request import GenerationRequest, SamplingParams, TokenLogprob


@dataclass(eq=False)
class RequestState:
    """One submitted request, from `Engine.submit` until its last sibling has finished."""

    req: GenerationRequest
    loop: asyncio.AbstractEventLoop  # the caller's loop, where its events are delivered
    queue: asyncio.Queue
    models: list[str]  # models its composition uses, in family order
    cost: int  # prompt tokens to prefill (longest per-model prompt)
    done: int = 0  # siblings finished (consumer side)
    chunks: dict[str, ModelBatch] = field(default_factory=dict)  # chunked prefill in progress
    cursor: dict[str, int] = field(default_factory=dict)
    last_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_lp: list[TokenLogprob | None] | None = None  # echo scoring, sent with the 1st token
    reasons: list[str] = field(default_factory=list)  # finish reasons of its siblings so far

    @property
    def rid(self) -> str:
        return self.req.request_id


@dataclass(eq=False)
class Sequence:
    """One running row of the batch: a sibling sequence of a request."""

    request: RequestState
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def first_prompt(self) -> list[int]:
        return self.request.req.prompt_ids[self.request.models[0]]
