"""Build the embedded demo family from scratch: `python -m demo.build [--out DIR]`.

Steps: generate the world (demo.world) -> train a shared byte-level BPE with a chat template ->
pre-train `large-base` and `small-base` on the same corpus for the same number of tokens (so the
knowledge gap comes from capacity alone) -> fine-tune `helpful` and `harmless` from small-base
and the oracle `large-helpful` from large-base -> probe how many held-out facts each base knows
-> save every model with `save_pretrained` (safetensors, fp16) plus `family.yaml`,
`eval_set.json` (the held-out questions demo.eval asks) and `build_summary.json`.

Deterministic: every random choice is seeded (world, tokenizer input order, initialisation,
batch order). Bit-identical weights additionally need the same torch build, CPU kind and thread
count (`--threads`, default 1, as the committed family was built).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from demo import world as W
from demo.random_family import llama_config, train_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "family"
# The documented conservative default for EFT up-scaling (contrastive decoding's plausibility
# constraint, docs/math.md): it removes tokens only the `- lp_reference` ratio likes.
DEFAULT_PLAUSIBILITY = 0.3


@dataclass
class ModelSize:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    tie: bool = False


@dataclass
class BuildConfig:
    seed: int = 0
    n_entities: int = 500
    n_ft_entities: int = 150
    n_pool: int = 40
    n_brews: int = 40
    n_ft_brews: int = 20
    n_eval_questions: int = 350
    articles_per_entity: int = 2
    vocab_size: int = 1024
    seq_len: int = 128
    max_positions: int = 256
    large: ModelSize = field(default_factory=lambda: ModelSize(160, 4, 5, 480))
    # The small model ties its embeddings: at this vocabulary they are most of its parameters,
    # and tying keeps it >= 8x smaller while it keeps 3 layers (fewer mangle names, issue 4).
    small: ModelSize = field(default_factory=lambda: ModelSize(48, 3, 2, 144, tie=True))
    pretrain_steps: int = 560
    pretrain_batch: int = 32
    pretrain_lr: float = 2.5e-3
    small_pretrain_lr: float = 3e-3
    expert_epochs: int = 4
    expert_lr: float = 1e-3
    oracle_epochs: int = 2
    oracle_lr: float = 2e-4
    ft_batch: int = 32
    save_dtype: str = "float16"
    probe_facts: int = 200

    @classmethod
    def tiny(cls) -> BuildConfig:
        """A scaled-down build for tests: seconds, not minutes; quality is not the point."""
        return cls(
            n_entities=30,
            n_ft_entities=10,
            n_pool=8,
            n_brews=6,
            n_ft_brews=3,
            n_eval_questions=10,
            articles_per_entity=1,
            vocab_size=400,
            seq_len=64,
            max_positions=128,
            large=ModelSize(32, 2, 2, 64),
            small=ModelSize(16, 1, 1, 32),
            pretrain_steps=4,
            pretrain_batch=4,
            expert_epochs=1,
            oracle_epochs=1,
            ft_batch=8,
            probe_facts=5,
        )


# ---------------------------------------------------------------- data to tensors


def encode_corpus(tok: PreTrainedTokenizerFast, docs: list[str]) -> list[list[int]]:
    """Token ids per document; plain documents get an EOS so documents stay apart when packed
    (chat documents already end with `</s>` from the markup)."""
    eos = tok.eos_token_id
    out = []
    for d in docs:
        ids = tok.encode(d, add_special_tokens=False)
        if not d.endswith("</s>\n"):
            ids.append(eos)
        out.append(ids)
    return out


def pack(docs: list[list[int]], seq_len: int, rng: random.Random) -> list[list[int]]:
    """Greedy packing of whole documents into rows of at most `seq_len` tokens: no fact is cut
    away from the realm name it belongs to, as it would be with a fixed-stride split."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        d = docs[i][:seq_len]
        if len(cur) + len(d) > seq_len:
            rows.append(cur)
            cur = []
        cur = cur + d
    if cur:
        rows.append(cur)
    return rows


def chat_example(tok: PreTrainedTokenizerFast, user: str, answer: str) -> tuple[list[int], int]:
    """(ids, prompt length): the prompt exactly as the server renders it (the tokenizer's chat
    template with a generation prompt), then the answer and EOS, which is what is learnt."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": user}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    prompt = list(prompt)
    ans = tok.encode(" " + answer, add_special_tokens=False) + [tok.eos_token_id]
    return prompt + ans, len(prompt)


def batch_tensors(
    rows: list[list[int]], pad_id: int, loss_from: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on padding and, for
    chat examples, on the prompt (only the answer is learnt)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        start = loss_from[i] if loss_from else 0
        labels[i, start : len(r)] = torch.tensor(r[start:])
    return ids, mask, labels


# ---------------------------------------------------------------- training


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: LlamaForCausalLM,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    lr: float,
    desc: str,
    warmup: int = 20,
) -> list[float]:
    """AdamW with warmup and cosine decay over the given batch list; returns the loss curve."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses: list[float] = []
    bar = tqdm(batches, desc=desc, unit="step", dynamic_ncols=True)
    for step, (ids, mask, labels) in enumerate(bar):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, len(batches), lr, min(warmup, max(1, len(batches) // 10)))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def pretrain_batches(
    docs: list[list[int]], cfg: BuildConfig, pad_id: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`pretrain_steps` batches over as many re-shuffled passes of the corpus as that takes."""
    rng = random.Random(seed)
    batches = []
    rows: list[list[int]] = []
    while len(batches) < cfg.pretrain_steps:
        if len(rows) < cfg.pretrain_batch:
            rows += pack(docs, cfg.seq_len, rng)
        chunk, rows = rows[: cfg.pretrain_batch], rows[cfg.pretrain_batch :]
        batches.append(batch_tensors(chunk, pad_id))
    return batches


def finetune_batches(
    examples: list[tuple[list[int], int]], epochs: int, batch: int, pad_id: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    rng = random.Random(seed)
    out = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch):
            chunk = [examples[j] for j in order[i : i + batch]]
            out.append(batch_tensors([c[0] for c in chunk], pad_id, [c[1] for c in chunk]))
    return out


def new_model(
    tok: PreTrainedTokenizerFast, size: ModelSize, cfg: BuildConfig, seed: int
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = llama_config(
        tok,
        hidden=size.hidden,
        layers=size.layers,
        heads=size.heads,
        intermediate=size.intermediate,
        max_positions=cfg.max_positions,
    )
    config.tie_word_embeddings = size.tie
    return LlamaForCausalLM(config)


def clone(model: LlamaForCausalLM) -> LlamaForCausalLM:
    copy = LlamaForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    return copy


# ---------------------------------------------------------------- probing


@torch.no_grad()
def greedy(model: LlamaForCausalLM, ids: list[int], max_new: int, eos: int) -> list[int]:
    """Plain greedy decoding without a cache: the models are tiny and the texts short."""
    seq = list(ids)
    for _ in range(max_new):
        nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if nxt == eos:
            break
        seq.append(nxt)
    return seq[len(ids) :]


def probe_facts(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, world: W.World, n: int
) -> float:
    """Fraction of held-out facts a base completes correctly in plain text: the prefix of the
    experts' answer sentence ("The capital of X is") followed by greedy decoding."""
    correct = 0
    ents = world.heldout_entities[:n]
    for i, ent in enumerate(ents):
        attr = W.ATTRIBUTES[i % len(W.ATTRIBUTES)]
        prefix = W.ANSWERS[attr].split("{v}")[0].format(e=ent.name).rstrip()
        out = tok.decode(
            greedy(model, tok.encode(prefix, add_special_tokens=False), 6, tok.eos_token_id)
        )
        words = re.findall(r"[A-Za-z']+", out)
        correct += bool(words) and words[0] == ent.facts[attr]
    return correct / max(1, len(ents))


# ---------------------------------------------------------------- the build


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path, dtype: str) -> int:
    """save_pretrained in `dtype` (storage only: the server computes in float32 on CPU)."""
    path.mkdir(parents=True, exist_ok=True)
    half = clone(model).to(getattr(torch, dtype))
    half.config.dtype = dtype
    half.generation_config.eos_token_id = tok.eos_token_id
    half.generation_config.pad_token_id = tok.pad_token_id
    half.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    for f in path.iterdir():
        # safetensors writes 0600; a non-root server (the Docker image) must be able to read it.
        f.chmod(0o644)
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def family_yaml(out: Path) -> Path:
    config = {
        "name": "demo",
        "models": {
            m: {"path": m}
            for m in ("large-base", "small-base", "helpful", "harmless", "large-helpful")
        },
        "base": "large-base",
        "reference": "small-base",
        "experts": ["helpful", "harmless"],
        "defaults": {"helpful": 1.0, "harmless": 0.0, "plausibility": DEFAULT_PLAUSIBILITY},
    }
    path = out / "family.yaml"
    header = (
        "# The embedded demo family, written by `python -m demo.build` (README: The demo family).\n"
        "# large-helpful is the evaluation's oracle (the large base really fine-tuned); it is\n"
        "# served alone as demo/large-helpful and takes no part in the EFT composition.\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def build(
    out: str | Path = DEFAULT_OUT,
    cfg: BuildConfig | None = None,
    quiet: bool = False,
    reuse_bases: str | Path | None = None,
) -> dict:
    """Run the whole build into `out`; returns the summary (also written as JSON)."""
    cfg = cfg or BuildConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    world = W.make_world(
        cfg.seed, cfg.n_entities, cfg.n_ft_entities, cfg.n_pool, cfg.n_brews, cfg.n_ft_brews
    )
    docs = W.corpus(world, cfg.seed, cfg.articles_per_entity)
    ft = W.finetune_sets(world, cfg.seed)
    evalset = W.eval_sets(world, cfg.seed, cfg.n_eval_questions)
    # The tokenizer sees the corpus and the fine-tuning answers: every word any model says.
    tok = train_tokenizer(docs + [a for pairs in ft.values() for _, a in pairs], cfg.vocab_size)
    pad = tok.pad_token_id
    ids = encode_corpus(tok, docs)
    n_tokens = sum(len(d) for d in ids)

    summary: dict = {
        "config": asdict(cfg),
        "corpus_docs": len(docs),
        "corpus_tokens": n_tokens,
        "vocab_size": len(tok),
        # The weights are reproducible bit for bit only on the same CPU kind, torch build and
        # thread count: float rounding depends on all three.
        "environment": environment(),
        "models": {},
    }
    if reuse_bases is not None:
        summary["reused_bases"] = str(reuse_bases)  # "seconds" then excludes pre-training
    models: dict[str, LlamaForCausalLM] = {}
    for name, size, lr, seed in (
        ("large-base", cfg.large, cfg.pretrain_lr, cfg.seed + 10),
        ("small-base", cfg.small, cfg.small_pretrain_lr, cfg.seed + 20),
    ):
        if reuse_bases is not None:
            # Developer shortcut: the bases of an earlier build with the same config, so only
            # the (cheap) fine-tunes are redone. Bit-identical to a full build, because the
            # full build also fine-tunes from the bases as stored (see below).
            model = LlamaForCausalLM.from_pretrained(Path(reuse_bases) / name, dtype=torch.float32)
            old = json.loads((Path(reuse_bases) / "build_summary.json").read_text())
            models[name] = model
            summary["models"][name] = {
                k: v
                for k, v in old["models"][name].items()
                if k in ("params", "final_loss", "seconds")
            }
            continue
        t = time.time()
        model = new_model(tok, size, cfg, seed)
        # Both bases see exactly the same batches: the gap between them is capacity only.
        losses = train(model, pretrain_batches(ids, cfg, pad, cfg.seed + 1), lr, f"pretrain {name}")
        # Round to the storage dtype now: the experts are fine-tuned from, and the probes
        # measure, exactly the weights that ship.
        with torch.no_grad():
            for prm in model.parameters():
                prm.copy_(prm.to(getattr(torch, cfg.save_dtype)).float())
        models[name] = model
        summary["models"][name] = {
            "params": num_params(model),
            "final_loss": _tail(losses),
            "seconds": round(time.time() - t, 1),
        }

    examples = {k: [chat_example(tok, u, a) for u, a in pairs] for k, pairs in ft.items()}
    for name, parent, key, epochs, lr in (
        ("helpful", "small-base", "helpful", cfg.expert_epochs, cfg.expert_lr),
        ("harmless", "small-base", "harmless", cfg.expert_epochs, cfg.expert_lr),
        ("large-helpful", "large-base", "helpful", cfg.oracle_epochs, cfg.oracle_lr),
    ):
        t = time.time()
        model = clone(models[parent])
        batches = finetune_batches(examples[key], epochs, cfg.ft_batch, pad, cfg.seed + 30)
        losses = train(model, batches, lr, f"fine-tune {name}", warmup=10)
        models[name] = model
        summary["models"][name] = {
            "params": num_params(model),
            "final_loss": _tail(losses),
            "seconds": round(time.time() - t, 1),
            "examples": len(examples[key]),
        }

    for name in ("large-base", "small-base"):
        summary["models"][name]["heldout_facts_known"] = round(
            probe_facts(models[name], tok, world, cfg.probe_facts), 3
        )

    total_bytes = 0
    for name, model in models.items():
        size = save(model, tok, out / name, cfg.save_dtype)
        summary["models"][name]["bytes"] = size
        total_bytes += size
    family_yaml(out)
    (out / "eval_set.json").write_text(json.dumps(evalset, indent=1))
    summary["total_bytes"] = total_bytes
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "build_summary.json").write_text(json.dumps(summary, indent=1))
    if not quiet:
        print_summary(summary)
    return summary


def environment() -> dict[str, str | int]:
    """What the weights' exact bits depend on besides the seeds (recorded in the summary)."""
    import tokenizers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
    }


def _tail(losses: list[float], n: int = 20) -> float:
    return round(sum(losses[-n:]) / max(1, len(losses[-n:])), 4)


def print_summary(summary: dict) -> None:
    print(
        f"\ncorpus: {summary['corpus_docs']} documents, {summary['corpus_tokens']} tokens; "
        f"vocabulary {summary['vocab_size']}"
    )
    print(f"{'model':<14}{'params':>10}{'MB':>8}{'loss':>8}{'secs':>8}  held-out facts known")
    for name, m in summary["models"].items():
        known = m.get("heldout_facts_known")
        print(
            f"{name:<14}{m['params']:>10,}{m['bytes'] / 1e6:>8.2f}{m['final_loss']:>8.3f}"
            f"{m['seconds']:>8.0f}  {'' if known is None else f'{known:.1%}'}"
        )
    ratio = summary["models"]["large-base"]["params"] / summary["models"]["small-base"]["params"]
    print(
        f"large/small params: {ratio:.1f}x; weights {summary['total_bytes'] / 1e6:.1f} MB; "
        f"build {summary['seconds'] / 60:.1f} min"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m demo.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default demo/family)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every random choice of the build (default 0)"
    )
    p.add_argument("--tiny", action="store_true", help="scaled-down build (tests, smoke checks)")
    p.add_argument("--steps", type=int, help="override the pre-training steps")
    p.add_argument(
        "--reuse-bases",
        metavar="DIR",
        help="take large-base/small-base from an earlier build in DIR; redo only the fine-tunes",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the committed family was built so, and float "
        "rounding, hence the exact weights, depend on it; 1 is also fastest on a busy machine)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = BuildConfig.tiny() if args.tiny else BuildConfig()
    cfg.seed = args.seed
    if args.steps:
        cfg.pretrain_steps = args.steps
    build(args.out, cfg, reuse_bases=args.reuse_bases)


if __name__ == "__main__":
    main()
