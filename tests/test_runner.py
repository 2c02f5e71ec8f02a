"""`ModelRunner` alone: the paged pool and the flattened forward against full-sequence
forwards, and the block bookkeeping (sharing, prefix keys, sliding windows, roll back)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from decoding.blocks import NULL_BLOCK, BlockPool, KVSeq, OutOfBlocks
from decoding.family import LoadedModel
from decoding.runner import ModelRunner

V = 200


def runner(model_type: str, blocks: int = 64, block_size: int = 4, **extra) -> ModelRunner:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        initializer_range=0.2, **extra,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    cpu = torch.device("cpu")
    tok = SimpleNamespace(pad_token_id=0)
    r = ModelRunner(LoadedModel("m", model, tok, cpu, cpu, torch.float32, 0, 128, "plain"))
    r.allocate_pool(blocks, block_size, prefix_caching=True)
    return r


@torch.inference_mode()
def full(r: ModelRunner, ids: list[int]) -> torch.Tensor:
    return r.module(torch.tensor([ids])).logits[0, -1]


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (5 + 3 * i,), generator=gen).tolist() for i in range(n)]


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_decode_rows_and_prompt_chunks_in_one_forward_match_full_forwards(model_type, extra):
    r = runner(model_type, **extra)
    seqs = prompts(4)
    hs = [r.allocate() for _ in seqs]
    last = r.forward(hs[:2], [seqs[0], seqs[1]])
    r.forward(hs[2:], [seqs[2][:4], seqs[3][:4]])  # prompts in two chunks
    toks = [int(last[0].argmax()), int(last[1].argmax())]
    for s, t in zip(seqs, toks):
        s.append(t)
    # Two decode rows (ids on the device) and two prompt chunks, one forward.
    out = r.forward(hs, [None, None, seqs[2][4:], seqs[3][4:]], torch.tensor(toks))
    for _ in range(10):
        for i in range(4):
            torch.testing.assert_close(out[i], full(r, seqs[i]), atol=1e-4, rtol=0)
        toks = [int(o.argmax()) for o in out]
        for s, t in zip(seqs, toks):
            s.append(t)
        out = r.decode(hs, torch.tensor(toks))
    if "sliding_window" in extra:  # blocks behind every layer's window were given back
        assert r.pool.num_used < sum(-(-len(s) // 4) for s in seqs)
    for h in hs:
        r.free(h)
    assert r.pool.num_used == 0 and r.nbytes() == 0 and r.num_tokens() == 0


def test_forked_siblings_share_full_blocks_and_decode_independently():
    r = runner("llama")
    a, b = prompts(2, seed=2)
    sa = r.allocate()
    first = r.prefill([sa], [a])[0]
    used = r.pool.num_used
    (sib,) = r.fork(sa, 1)
    assert r.pool.num_used == used  # every block shared, the partial last one too
    sb = r.allocate()
    r.prefill([sb], [b])
    r.free(sb)  # leaves at once; its blocks go back to the pool
    sc = r.allocate()
    c = prompts(1, seed=3)[0]
    r.prefill([sc], [c[:4]])
    r.prefill([sc], [c[4:]])
    t = int(first.argmax())
    out = r.decode([sa, sib, sc], torch.tensor([t, (t + 1) % V, 7]))
    # Both siblings wrote into the shared partial block: one of them got a copy first.
    assert r.seqs[sa].blocks[:-1] == r.seqs[sib].blocks[:-1]
    assert r.seqs[sa].blocks[-1] != r.seqs[sib].blocks[-1]
    torch.testing.assert_close(out[0], full(r, a + [t]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], full(r, a + [(t + 1) % V]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[2], full(r, c + [7]), atol=1e-4, rtol=0)
    assert r.num_tokens() == 2 * (len(a) + 1) + len(c) + 1


def test_a_cached_prefix_is_reused_and_only_the_rest_is_computed():
    r = runner("llama")
    (ids,) = prompts(1, seed=4)
    ids = (ids * 4)[:18]  # 4 full blocks of 4 and 2 tokens
    h = r.allocate()
    want = r.prefill([h], [ids])[0]
    r.free(h)  # its full blocks stay cached
    again = r.allocate()
    hit = r.match_prefix(again, ids)
    assert hit == 16
    got = r.prefill([again], [ids[hit:]])[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # A prompt that is all cached still computes its last token (its logits are needed).
    r.free(again)
    exact = r.allocate()
    assert r.match_prefix(exact, ids[:16]) == 12


def test_self_check_refuses_a_model_that_ignores_the_paged_attention():
    from decoding.runner import UnsupportedModelError

    r = runner("llama")
    r.self_check()  # a supported architecture passes and leaves no KV behind
    assert not r.active and r.pool.num_used == 0
    r.windows = [1] * len(r.windows)  # as if attention saw one key only
    with pytest.raises(UnsupportedModelError, match="differs from its own full forward"):
        r.self_check()
    assert not r.active


def test_block_pool_reference_counts_lru_eviction_and_roll_back():
    pool = BlockPool(num_blocks=5, block_size=2)
    a = KVSeq("m")
    pool.reserve(a, 4)
    a.tokens = [1, 2, 3, 4]
    pool.commit(a)
    assert len(pool.by_key) == 2 and pool.num_free == 2
    b = KVSeq("m")
    assert pool.match(b, [1, 2, 3, 4, 5]) == 4  # shares both blocks
    assert pool.refs[a.blocks[0]] == 2
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 4  # cached blocks count as free...
    c = KVSeq("m")
    pool.reserve(c, 8)  # ...and are evicted, least recently used last
    assert not pool.by_key and pool.num_free == 0
    with pytest.raises(OutOfBlocks):
        pool.reserve(KVSeq("m"), 1)
    # Roll back into a keyed block: it loses its key (its tail will be overwritten).
    pool.free(c)
    d = KVSeq("m")
    pool.reserve(d, 4)
    d.tokens = [5, 6, 7, 8]
    pool.commit(d)
    pool.truncate(d, 3)
    assert len(pool.by_key) == 1 and len(d.blocks) == 2
    other = KVSeq("other")  # another member never matches these keys
    assert pool.match(other, [5, 6, 7, 8, 9]) == 0
    pool.drop_before(d, 2)
    assert d.blocks[0] == NULL_BLOCK


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_decode_graph_buffers_match_full_forwards_as_the_batch_shrinks_and_grows(model_type, extra):
    """Decode through `DecodeGraphs`' persistent buffers (no capture on a CPU): batches of 5,
    3, 1 and 4 rows use buckets 8, 4, 1 and 4, so padding rows and rows left over from a
    larger batch sit in the buffers; every row still equals its full forward."""
    r = runner(model_type)
    assert r.enable_graphs(max_batch=8, max_len=64, capture=False) is None
    assert r.graphs.buckets == [1, 2, 4, 8] and r.graphs.width == 16
    seqs = prompts(5)
    hs = [r.allocate() for _ in seqs]
    last = r.forward(hs, seqs)
    nxt = [int(x.argmax()) for x in last]  # each sequence's next token
    assert r.graphs is not None
    for rows in ([0, 1, 2, 3, 4], [0, 2, 4], [3], [0, 1, 3, 4], [0, 1, 2, 3, 4]):
        for _ in range(3):
            for i in rows:
                seqs[i].append(nxt[i])
            out = r.decode([hs[i] for i in rows], torch.tensor([nxt[i] for i in rows]))
            for j, i in enumerate(rows):
                torch.testing.assert_close(out[j], full(r, seqs[i]), atol=1e-4, rtol=0)
                nxt[i] = int(out[j].argmax())
    assert max(len(s) for s in seqs) > 6 + 4  # past the window, across blocks


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_decode_keys_kept_between_steps_match_full_forwards_as_rows_change(model_type, extra):
    """On a CPU the decode rows' keys stay in `DecodeKV` from one step to the next (the new
    token written, no gather): through rows leaving, a roll back, a verify block, a fork, a
    prompt joining and rows outgrowing it, every decode still equals its full forward, and
    every gather reuses the storage of the first."""
    r = runner(model_type, blocks=256)
    kv = r.decode_kv
    seqs = prompts(4)
    hs = [r.allocate() for _ in seqs]
    nxt = [int(x.argmax()) for x in r.forward(hs, seqs)]
    carried = 0

    def decode(rows: list[int], steps: int) -> None:
        nonlocal carried
        for _ in range(steps):
            for i in rows:
                seqs[i].append(nxt[i])
            held = (kv.rows, kv.capacity)
            out = r.decode([hs[i] for i in rows], torch.tensor([nxt[i] for i in rows]))
            carried += held == (tuple(hs[i] for i in rows), kv.capacity)
            for j, i in enumerate(rows):
                torch.testing.assert_close(out[j], full(r, seqs[i]), atol=1e-4, rtol=0)
                nxt[i] = int(out[j].argmax())

    decode([0, 1, 2, 3], 1)  # the first gather
    storage = [t.data_ptr() for t in kv._k + kv._v]
    decode([0, 1, 2, 3], 13)  # past the first capacity: gathered again, wider
    decode([0, 2, 3], 3)  # a row left
    r.truncate(hs[0], len(seqs[0]) - 2)  # a speculative block's tail rolled back
    del seqs[0][-2:]
    decode([0, 2, 3], 3)
    block = [5, 6, 7]  # a verify block through the general forward
    seqs[2].extend(block)
    nxt[2] = int(r.forward([hs[2]], [block])[0].argmax())
    decode([0, 2, 3], 3)
    hs.append(r.fork(hs[3], 1)[0])  # an n > 1 sibling
    seqs.append(list(seqs[3]))
    nxt.append(nxt[3])
    decode([0, 2, 3, 4], 3)
    # A prompt joins: its chunk and the decode rows in one forward, the decode rows' keys
    # carried over; then one row's verify block in one forward with the others' decode tokens.
    for new, chunk_of in ((None, None), (2, [9, 8, 7])):
        rows = [0, 2, 3, 4]
        if new is None:
            hs.append(r.allocate())
            seqs.append(prompts(6, seed=3)[5])
            chunk_of, new = seqs[-1], len(seqs) - 1
            nxt.append(0)
        else:
            seqs[new].extend(chunk_of)
            rows.remove(new)
        for i in rows:
            seqs[i].append(nxt[i])
        held = (kv.rows, kv.capacity)
        out = r.forward([hs[i] for i in rows] + [hs[new]], [None] * len(rows) + [list(chunk_of)],
                        torch.tensor([nxt[i] for i in rows]))  # fmt: skip
        if new == 5:  # the joining prompt's chunk left the held keys be
            assert held == (kv.rows, kv.capacity) == (tuple(hs[i] for i in rows), kv.capacity)
        for j, i in enumerate([*rows, new]):
            torch.testing.assert_close(out[j], full(r, seqs[i]), atol=1e-4, rtol=0)
            nxt[i] = int(out[j].argmax())
        decode([0, 2, 3, 4, 5], 2)
    assert carried >= 18  # most steps carried the keys over
    # Every gather reused the storage allocated at the first: no allocation in a step, and
    # memory that does not rise and fall with the batch.
    assert [t.data_ptr() for t in kv._k + kv._v] == storage
    kv.max_tokens = 0  # rows it may not hold: gathered per layer, as without it
    decode([0, 1, 2, 3, 4, 5], 2)
    assert kv.rows is None
