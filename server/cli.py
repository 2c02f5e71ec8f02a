"""`eft-serve`: load a family, start the engine, serve the OpenAI-compatible API (README).

With no `--config` it serves the embedded demo family (`demo/family/family.yaml` inside the
installed `demo` package) on 127.0.0.1:8000; `--model PATH` serves one model alone.
SIGTERM/SIGINT: uvicorn stops accepting connections, in-flight requests get
`--shutdown-timeout` seconds to finish, then the lifespan shuts the engine down (aborting
what is left) and the process exits 0. A second SIGINT ends every open request at once (a
stream with an error chunk and [DONE], another request with a 503) and the process exits 130.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from decoding.config import EngineConfig  # a plain dataclass: cheap before the checks
from server.version import package_version

log = logging.getLogger("eft_serve")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
FORCE_GRACE_S = 2.0  # after a second SIGINT: for the ended requests' last bytes to go out


def default_config() -> Path:
    """The demo family's YAML, located through the installed `demo` package (not the cwd)."""
    import demo

    return Path(demo.__file__).resolve().parent / "family" / "family.yaml"


class _HelpFormatter(argparse.HelpFormatter):
    """Adds an option's default to its help unless the help already states one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, "", argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _speculative(value: str) -> str:
    if value in ("auto", "off") or (value.isdigit() and 1 <= int(value) <= 8):
        return value
    raise argparse.ArgumentTypeError("must be auto, off or a block length from 1 to 8")


# Decimal prefixes are powers of 1000 and binary ones (with "i") powers of 1024, as in vLLM and
# Kubernetes, so "8GB" and "8GiB" both mean what a reader of either convention expects.
_SIZE_UNITS = {
    "": 1,
    **{p: 1000 ** (i + 1) for i, p in enumerate("kmgt")},
    **{p + "i": 1024 ** (i + 1) for i, p in enumerate("kmgt")},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512MiB", "8GB", "1.5GiB" or "64k" (unit letters in any case,
    the trailing B optional). Decimal arithmetic keeps "1.5GiB" exact; a size that is not a
    whole number of bytes, or not positive, is refused rather than rounded."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{text!r} is not a size: a number of bytes, optionally with a unit "
            "(kB, MB, GB, TB = 1000^n; KiB, MiB, GiB, TiB = 1024^n)"
        )
    size = Decimal(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    if size != size.to_integral_value() or size <= 0:
        raise ValueError(f"{text!r} is not a positive whole number of bytes")
    return int(size)


def _kv_cache_memory(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _gpu_memory_utilization(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value!r}: must be a fraction in (0, 1]")
    return share


def _block_size(value: str) -> int:
    # vLLM's range: a block is the unit of sharing and of waste (a sequence's last block is
    # partly empty), so large blocks share fewer prefixes and strand more memory.
    n = int(value) if value.isdigit() else 0
    if not 1 <= n <= 256 or n & (n - 1):
        raise argparse.ArgumentTypeError(f"{value!r}: must be a power of two from 1 to 256")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eft-serve",
        description="OpenAI-compatible server for emulated fine-tuning: a large base model "
        "steered per request by small fine-tuned experts (the `eft` knobs).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument(
        "--check",
        action="store_true",
        help="pre-flight: read the family's configs and tokenizers only (no weights), print each "
        "model's size, KV per token and device, the shared vocabulary, the answer-boundary "
        "verdict and whether it fits, then exit 0 (ok) or 2",
    )
    p.add_argument(
        "--config",
        default=None,
        help="family YAML (docs/family.md); default: the embedded demo family "
        "(demo/family/family.yaml of the installed package)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help="serve this one model alone, no YAML: a local directory, a hub id or a "
        ".gguf file (instead of --config)",
    )
    p.add_argument(
        "--gguf-file", default=None, help="with --model DIR_OR_ID: the GGUF file inside it to load"
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="with --model: the id /v1/models lists (default: the model's file or folder name)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="cap on prompt + output tokens per sequence (default: the family's "
        "max_model_len, else the smallest context of its models)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--api-key",
        default=os.environ.get("EFT_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize "
        "(default: env EFT_API_KEY; unset = no auth, logged as a warning; an "
        "empty key is refused)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="override every model's device: cpu, cuda, cuda:N or auto "
        "(default: each model's own, else cuda when available)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="override every model's dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="sequences decoded together in one step (n siblings count separately)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="sequences (prompts x n) queued for a batch row; a request that does not fit "
        "gets 429",
    )
    p.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=64,
        help="sequences (prompts x n) one request may ask for; more is a 400. Keep it well "
        "below --max-waiting so that no single request can fill the queue",
    )
    p.add_argument(
        "--speculative",
        default="auto",
        type=_speculative,
        help="speculative EFT decoding (the expert drafts, the models verify; the "
        "output distribution is unchanged): auto (only where it measures "
        "faster), off, or K (always, blocks of up to K tokens)",
    )
    p.add_argument(
        "--prefill-share",
        type=float,
        default=0.0,
        help="while rows decode, cap the prompt tokens a step may prefill at this many per "
        "decoding row (smoother streams, later first tokens); 0 (default): only "
        "--max-num-batched-tokens limits them",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="tokens one step may process: one per decoding row, the rest for prompt "
        "chunks (longer prompts are chunked; default 512)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=_kv_cache_memory,
        default=None,
        metavar="SIZE",
        help="bytes for every model's KV-cache pool together, allocated once at "
        "start, e.g. 8GiB, 512MiB, 4GB (kB/MB/GB = 1000^n, KiB/MiB/GiB = "
        "1024^n); wins over --gpu-memory-utilization (default: sized from the "
        "device)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=_gpu_memory_utilization,
        default=0.9,
        metavar="F",
        help="on CUDA without --kv-cache-memory: the share of GPU memory the "
        "process may use; what weights and activations leave of it is the KV "
        "pool",
    )
    p.add_argument(
        "--block-size",
        type=_block_size,
        default=16,
        metavar="N",
        help="tokens per KV-cache block (a power of two from 1 to 256)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not share the KV of equal prompt prefixes between requests (default: shared)",
    )
    p.add_argument(
        "--cuda-graphs",
        default="auto",
        choices=("auto", "on", "off"),
        help="replay plain decode steps from CUDA graphs: on (checked against eager decode at "
        "start, eager where they differ), off, or auto (off until verified on a GPU)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads torch may use per operation (default: torch's own, one "
        "per core). 1 is much faster for small models on a shared machine",
    )
    p.add_argument(
        "--allow-negative-weights",
        action="store_true",
        help="accept negative expert weights. They invert a fine-tuning (published "
        "as 'emulated disalignment', a way to strip safety training): only for "
        "research deployments",
    )
    p.add_argument(
        "--allowed-origins",
        default="",
        help="comma-separated origins browsers may call from (CORS), e.g. "
        "'http://localhost:3000' or '*'; default: none",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest accepted request body; larger ones get 413",
    )
    p.add_argument(
        "--max-response-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest response a request may ask for, estimated before any work from "
        "prompts x n x tokens x logprob/trace entries; larger asks get 400",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish after SIGTERM/SIGINT; then "
        "each open stream gets an error chunk and [DONE], others a 503",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a request's head, and then its body, may take to arrive",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="open connections at most; requests beyond it get 503, connections "
        "beyond it are closed",
    )
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="logging verbosity")
    return p


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine's settings from the parsed flags."""
    cfg = EngineConfig(
        max_batch_size=args.max_batch_size,
        max_waiting=args.max_waiting,
        max_seqs_per_request=args.max_seqs_per_request,
        speculative=args.speculative,
        prefill_share=max(0.0, args.prefill_share),
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        prefix_caching=args.prefix_caching,
        cuda_graphs=args.cuda_graphs,
    )
    if args.max_num_batched_tokens:
        cfg.max_num_batched_tokens = args.max_num_batched_tokens
    return cfg


def _server_class(on_drain: Callable[[], None], on_force: Callable[[], None] | None = None
                  ) -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises a captured SIGTERM/SIGINT after its graceful shutdown, so the
        process would die of the signal (exit -15); a clean drain must exit 0. A second SIGINT
        ends every open request now (`on_force`: error chunk + [DONE], or a 503), gives their
        last bytes `FORCE_GRACE_S` to go out, then stops waiting; the exit code is then 130."""

        forced = False

        def handle_exit(self, sig: int, frame: object) -> None:
            if self.should_exit and sig == signal.SIGINT:
                if self.forced:
                    self.force_exit = True  # a third one stops waiting at once
                    return
                self.forced = True
                log.warning("second SIGINT: ending open requests now")
                if on_force is not None:
                    on_force()
                timer = threading.Timer(FORCE_GRACE_S, setattr, (self, "force_exit", True))
                timer.daemon = True
                timer.start()
            else:
                log.info("received %s: draining in-flight requests", signal.Signals(sig).name)
                on_drain()
                self.should_exit = True

    return Server


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if (
        args.max_batch_size < 1
        or args.max_waiting < 0
        or args.max_seqs_per_request < 1
        or args.max_response_bytes < 1
        or (args.threads is not None and args.threads < 1)
    ):
        print(
            "eft-serve: --max-batch-size, --max-seqs-per-request, --max-response-bytes and "
            "--threads must be >= 1, --max-waiting >= 0",
            file=sys.stderr,
        )
        return 2
    if args.api_key is not None and not args.api_key.strip():
        print(
            "eft-serve: --api-key (or EFT_API_KEY) is set but empty; give a key, or unset it "
            "to serve without authentication",
            file=sys.stderr,
        )
        return 2
    if args.model and args.config or (args.gguf_file or args.served_model_name) and not args.model:
        print(
            "eft-serve: --model serves one model instead of --config; --gguf-file and "
            "--served-model-name go with --model",
            file=sys.stderr,
        )
        return 2
    if args.max_model_len is not None and args.max_model_len < 1:
        print("eft-serve: --max-model-len must be >= 1", file=sys.stderr)
        return 2

    config = Path(args.config) if args.config else default_config()
    if not args.model and not config.is_file():
        hint = (
            "the embedded demo family is not built into this install"
            if not args.config
            else "no such file"
        )
        print(
            f"eft-serve: {config}: {hint}.\n"
            "Pass a family YAML with --config FILE (docs/family.md: name, models, base, "
            "reference, experts, defaults) or one model with --model PATH, e.g. build a tiny "
            "random family with\n"
            '  python -c "from demo.random_family import build_random_family as b; '
            "print(b('/tmp/tiny'))\"\n"
            "  eft-serve --config /tmp/tiny/family.yaml",
            file=sys.stderr,
        )
        return 2

    if args.check:
        return _check(args, config)

    # Heavy imports after argument checks, so `--help` and config errors answer at once.
    import uvicorn

    from decoding.engine import Engine
    from decoding.family import FamilyConfig, FamilyError, load_family
    from server.app import ServerSettings, create_app
    from server.knobs import model_ids
    from server.metrics import ServerMetrics

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # The startup log lists every model; transformers' per-file progress bars add noise.
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        if args.model:
            config = FamilyConfig.single(args.model, args.gguf_file, args.served_model_name)
        family = load_family(
            config, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len
        )
        metrics = ServerMetrics.for_family(family)
        # Engine() refuses an architecture it cannot run (a FamilyError, like a bad family).
        engine = Engine(family, engine_config(args), on_step=metrics.on_step)
    except FamilyError as exc:
        print(f"eft-serve: {exc}", file=sys.stderr)
        return 2
    engine.start()
    settings = ServerSettings(
        api_key=args.api_key or None,
        allow_negative_weights=args.allow_negative_weights,
        max_body_bytes=args.max_body_bytes,
        max_response_bytes=args.max_response_bytes,
        read_timeout_s=args.read_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        cors_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
    )
    app = create_app(engine, family, settings, metrics=metrics)

    cfg = family.config
    log.info(
        "family %r from %s: base=%s reference=%s experts=%s defaults=%s context=%d",
        cfg.name,
        args.model or config,
        cfg.base,
        cfg.reference,
        ",".join(cfg.experts),
        cfg.defaults,
        family.context_limit,
    )
    for name, m in family.models.items():
        log.info(
            "  model %-16s %8s params  %-8s %s",
            name,
            _fmt_params(m.num_params),
            str(m.dtype).removeprefix("torch."),
            m.input_device,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info(
        "serving on http://%s:%d  (models: %s)%s",
        host,
        args.port,
        # Exactly the ids /v1/models serves: a family of one model has no `X/X` id.
        ", ".join(model_ids(family)),
        "  [API key required]" if settings.api_key else "",
    )
    if not settings.api_key:
        log.warning("no --api-key: the API is open to anyone who can reach %s:%d", host, args.port)
    if args.allow_negative_weights:
        log.warning("negative expert weights are allowed (--allow-negative-weights)")

    from server.connections import bounded_protocol

    server = _server_class(app.state.begin_drain, app.state.end_now)(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            lifespan="on",
            access_log=args.log_level == "debug",
            http=bounded_protocol(args.read_timeout, args.max_connections),
            limit_concurrency=args.max_connections,
            # The app ends what is still open at --shutdown-timeout; uvicorn's own cut (which
            # drops streams mid-body) only backs that up.
            timeout_graceful_shutdown=args.shutdown_timeout + 5,
        )
    )
    server.run()  # handles SIGINT/SIGTERM: stop accepting, drain, lifespan shutdown
    if not server.started:
        return 1  # e.g. the port was taken; uvicorn has logged why
    if server.forced:
        log.warning("eft-serve stopped by a second SIGINT")
        return 130  # as a shell reports a process ended by Ctrl-C
    log.info("eft-serve stopped")
    return 0


def _check(args: argparse.Namespace, config: Path) -> int:
    """`--check`: decoding.preflight's report on stdout; exit 0 when it finds no problem."""
    from decoding.family import FamilyConfig, FamilyError
    from decoding.preflight import check

    try:
        family = (
            FamilyConfig.single(args.model, args.gguf_file, args.served_model_name)
            if args.model
            else config
        )
    except FamilyError as exc:
        print(f"eft-serve: {exc}", file=sys.stderr)
        return 2
    report = check(family, args.device, args.dtype, args.max_model_len,
                   args.gpu_memory_utilization)  # fmt: skip
    sys.stdout.write(report.text())
    return 0 if report.ok else 2


if __name__ == "__main__":
    sys.exit(main())
