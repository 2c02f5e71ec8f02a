"""`ModelRunner` alone: every addressing mode of the KV slots against full-sequence forwards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from decoding.family import LoadedModel
from decoding.runner import ModelRunner

V = 200


def runner(model_type: str, slots: int = 6, **extra) -> ModelRunner:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.2, **extra,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    cpu = torch.device("cpu")
    tok = SimpleNamespace(pad_token_id=0)
    return ModelRunner(
        LoadedModel("m", model, tok, cpu, cpu, torch.float32, 0, 128, "plain"), slots
    )


@torch.inference_mode()
def full(r: ModelRunner, ids: list[int]) -> torch.Tensor:
    return r.module(torch.tensor([ids])).logits[0, -1]


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (5 + 3 * i,), generator=gen).tolist() for i in range(n)]


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_sparse_rows_after_leaves_decode_like_full_forwards(model_type, extra):
    r = runner(model_type, **extra)
    seqs = prompts(6)
    slots = [r.allocate() for _ in seqs]
    last = r.prefill(slots, seqs)
    for k in range(4):  # slots 0..3 leave: the two left are sparse among six
        r.free(slots[k])
    alive = [4, 5]
    for _ in range(8):
        toks = [int(last[i].argmax()) for i in range(len(last))]
        if len(last) == 6:
            toks = [toks[k] for k in alive]
        for k, t in zip(alive, toks):
            seqs[k].append(t)
        last = r.decode([slots[k] for k in alive], torch.tensor(toks))
        for i, k in enumerate(alive):
            torch.testing.assert_close(last[i], full(r, seqs[k]), atol=1e-4, rtol=0)


def test_forked_siblings_and_a_reused_slot_decode_independently():
    r = runner("llama", slots=4)
    a, b = prompts(2, seed=2)
    sa = r.allocate()
    first = r.prefill([sa], [a])[0]
    (sib,) = r.fork(sa, 1)
    sb = r.allocate()
    r.prefill([sb], [b])
    r.free(sb)  # leaves at once; its slot is taken by the next prompt
    sc = r.allocate()
    assert sc == sb
    c = prompts(1, seed=3)[0]
    r.prefill([sc], [c[:4]])  # a prompt in two chunks: the second attends to the first
    r.prefill([sc], [c[4:]])
    t = int(first.argmax())
    out = r.decode([sa, sib, sc], torch.tensor([t, (t + 1) % V, 7]))
    torch.testing.assert_close(out[0], full(r, a + [t]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], full(r, a + [(t + 1) % V]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[2], full(r, c + [7]), atol=1e-4, rtol=0)
    assert r.num_tokens() == 2 * (len(a) + 1) + len(c) + 1


def test_buffers_are_released_when_the_last_sequence_leaves():
    r = runner("llama")
    s = r.allocate()
    r.prefill([s], prompts(1)[:1])
    assert r.nbytes() > 0
    r.free(s)
    assert r.nbytes() == 0 and r.num_tokens() == 0


def test_self_check_refuses_a_model_that_ignores_the_slot_masks():
    from decoding.runner import UnsupportedModelError

    r = runner("llama")
    r.self_check()  # a supported architecture passes and leaves no slot behind
    assert not r.active and r.nbytes() == 0
    r._masks = lambda q_pos, valid, width: None  # as a model that builds its own masks would
    with pytest.raises(UnsupportedModelError, match="differs from its own full forward"):
        r.self_check()
    assert not r.active


def test_a_full_slot_forks_into_siblings():
    """A prompt that fills its slot exactly: source and target rows of the copy then overlap in
    memory, which an in-place copy refuses (found by the 30-minute soak)."""
    r = runner("llama", slots=3)
    (ids,) = prompts(1, seed=4)
    ids = (ids * 20)[:64]  # 64 tokens: exactly the first capacity step
    s = r.allocate()
    first = r.prefill([s], [ids])[0]
    assert r.cache.capacity == r.lengths[s] == 64
    (sib,) = r.fork(s, 1)
    t = int(first.argmax())
    out = r.decode([s, sib], torch.tensor([t, (t + 1) % V]))
    torch.testing.assert_close(out[0], full(r, ids + [t]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], full(r, ids + [(t + 1) % V]), atol=1e-4, rtol=0)
