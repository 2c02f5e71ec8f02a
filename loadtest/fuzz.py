"""`python -m loadtest.fuzz`: schema fuzzing of a served `/openapi.json` (schemathesis).

    python -m loadtest.fuzz --cases 4000                  # starts eft-serve on a tiny family
    python -m loadtest.fuzz --url http://127.0.0.1:8000 --cases 500 --json fuzz.json

Every operation of the served schema gets request bodies (and path parameters) generated from
the schema, both valid ones (`positive`: the model id is mostly one the server serves, so the
cases reach generation) and invalid ones (`negative`), with a fixed seed. Each response must
pass: no 5xx, a status the schema lists, a content type it lists, a body and headers that match
its schema, and for every error the OpenAI shape `{"error": {"message", "type", "param",
"code"}}`. Then the hostile cases of `loadtest.hostile` (bodies that cost far more than their
size) must each be answered within 2 s, with a 200 or a 400 naming the limit, while `/health`
answers within 1 s (`--no-hostile` skips them). Prints the cases, statuses and failures; exits
1 on any failure.

Without `--url` it builds a tiny random family with a 64-token context (so a generated
`max_tokens` cannot make one case run for long) and serves it with `eft-serve`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class FuzzResult:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # (operation, mode) with no input to make
    per_run: dict[str, float] = field(default_factory=dict)  # seconds per (operation, mode)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "statuses": dict(sorted(self.statuses.items())),
            "failures": len(self.failures),
            "seconds": round(self.seconds, 1),
            "skipped": self.skipped,
            "seconds_per_run": self.per_run,
            "first_failures": self.failures[:5],
        }


def _openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    if response.status_code < 400:
        return None
    try:
        err = response.json()["error"]
    except Exception as exc:
        raise AssertionError(
            f"error body is not OpenAI-shaped JSON: {response.text[:200]!r}"
        ) from exc
    if not isinstance(err, dict) or set(err) != ERROR_KEYS or not err["message"]:
        raise AssertionError(f"error body is not in the OpenAI shape: {err!r}")
    return True


def run_fuzz(
    url: str,
    cases: int,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> FuzzResult:
    """Fuzz every operation of `url`/openapi.json with about `cases` cases in all."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        response_headers_conformance,
    ]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers or {})
    model_ids = [
        m["id"]
        for m in httpx.get(f"{url}/v1/models", headers=headers, timeout=timeout).json()["data"]
    ]
    operations = [op.ok() for op in schema.get_all_operations()]
    # Routes without inputs (GET /health, ...) answer the same to every case: a few each;
    # the rest of the budget goes to the routes with a body or a path parameter. Invalid
    # input exists only for bodies (a path parameter is any string: an unknown one is a 404).
    runs = [
        (op, mode)
        for op in operations
        for mode in GenerationMode
        if mode == GenerationMode.POSITIVE or op.method.upper() == "POST"
    ]
    fixed = [op for op in operations if not _has_input(op)]
    per_run = max(1, (cases - 2 * len(fixed)) // max(1, len(runs) - len(fixed)))
    result = FuzzResult()
    session = requests.Session()
    t0 = time.monotonic()

    def fuzz(op: Any, mode: GenerationMode) -> None:
        strategy = st.tuples(
            op.as_strategy(generation_mode=mode), st.sampled_from([*model_ids, None])
        )

        @hypothesis_seed(seed)
        @settings(
            max_examples=per_run if _has_input(op) else 2,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def one(pair: tuple[Any, str | None]) -> None:
            case, model = pair
            if (
                mode == GenerationMode.POSITIVE
                and model is not None
                and isinstance(case.body, dict)
                and "model" in case.body
            ):
                case.body["model"] = model  # reach past the 404 to generation
            response = case.call(base_url=url, session=session, headers=headers, timeout=timeout)
            result.cases += 1
            result.statuses[response.status_code] += 1
            try:
                case.validate_response(
                    response, checks=checks, additional_checks=[_openai_error_shape]
                )
            except Exception as exc:  # collected, not raised: no shrinking, one report
                result.failures.append(
                    {
                        "operation": f"{op.method.upper()} {op.path}",
                        "mode": str(mode),
                        "status": response.status_code,
                        "body": _short(case.body),
                        "response": response.text[:300],
                        "error": str(exc)[:600],
                    }
                )

        try:
            one()
        except Unsatisfiable:  # e.g. no invalid input exists for a route without parameters
            result.skipped.append(f"{op.method.upper()} {op.path} [{mode}]")

    for op, mode in runs:
        t = time.monotonic()
        fuzz(op, mode)
        result.per_run[f"{op.method.upper()} {op.path} [{mode}]"] = round(time.monotonic() - t, 1)
    result.seconds = time.monotonic() - t0
    return result


def _has_input(op: Any) -> bool:
    return op.method.upper() != "GET" or "{" in op.path


def _short(body: Any) -> str:
    try:
        text = json.dumps(body, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(body)
    return text[:300]


def small_family(out_dir: Path) -> Path:
    """A tiny random family with a 64-token context: no generated case runs for long."""
    from demo.random_family import build_random_family

    return build_random_family(out_dir, max_positions=64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.fuzz",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--url",
        default=None,
        help="server to fuzz (default: start eft-serve on a tiny random family)",
    )
    p.add_argument("--config", default=None, help="family YAML to serve when no --url")
    p.add_argument("--cases", type=int, default=400, help="cases in all, over every operation")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated cases")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--no-hostile", action="store_true", help="skip the hostile cases")
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    print(
        "reproduce: python -m loadtest.fuzz " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    def fuzz(url: str) -> FuzzResult:
        result = run_fuzz(url, args.cases, args.seed, headers)
        if not args.no_hostile:
            from loadtest import hostile

            bad = hostile.run(url, headers)
            result.failures += bad
            result.cases += len(hostile.cases("m", 64))
        return result

    if args.url:
        result = fuzz(args.url)
    else:
        from server.process import ServerProcess

        with tempfile.TemporaryDirectory(prefix="eft-fuzz-") as tmp:
            config = args.config or small_family(Path(tmp) / "family")
            # A small --max-response-bytes: the 64-token context cannot ask for 64 MiB; one
            # request may take half the queue.
            with ServerProcess(config, "--threads", "1", "--max-waiting", "64",
                               "--max-seqs-per-request", "32",
                               "--max-response-bytes", str(1 << 20)) as srv:
                result = fuzz(srv.url)
    summary = result.summary()
    print(
        f"{summary['cases']} cases in {summary['seconds']} s; statuses "
        f"{summary['statuses']}; failures {summary['failures']}"
    )
    for f in summary["first_failures"]:
        print(
            f"  FAIL {f['operation']} [{f['mode']}] -> {f['status']}: {f['error'][:300]}\n"
            f"       body {f['body'][:200]}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
