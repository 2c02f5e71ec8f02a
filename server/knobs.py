"""Model ids and the `eft` knob object -> the engine's `Composition`.

`/v1/models` lists the family id (the EFT composition) and `<family>/<model>` for every loaded
model; a family of one model is that model, and lists only its id. Knobs are checked here
against the family before the engine sees them, so each refusal names the exact parameter
(`eft.helpful`); the engine's `make_composition` then applies the semantics (defaults only when
no expert is named, unnamed experts weigh 0).
"""

from __future__ import annotations

from typing import Any

from decoding.composition import make_composition
from decoding.request import Composition, RequestValidationError
from server.errors import bad_request, not_found_model
from server.protocol import KNOB_ALIASES

FILTER_BOUNDS = {
    # name: (low, low_inclusive, high, high_inclusive)
    "base_top_p": (0.0, False, 1.0, True),
    "plausibility": (0.0, True, 1.0, False),
}


def single_model_ids(family: Any) -> dict[str, str]:
    """`<family>/<model>` -> model, the ids that serve one model of the family alone.

    None in a family of one model: its family id already is that model, and a vLLM user expects
    one id per model (`X`, not `X` and `X/X`).
    """
    if len(family.models) == 1:
        return {}
    return {f"{family.name}/{m}": m for m in family.models}


def model_ids(family: Any) -> list[str]:
    """Every id `/v1/models` lists and a request may name: the family's first."""
    return [family.name, *single_model_ids(family)]


def resolve_model(family: Any, model_id: str) -> str | None:
    """None for the EFT composition, else the single model's name; 404 for anything else.

    A family of one model also answers to the path or hub id it was loaded from, as vLLM's
    `--model Qwen/Qwen2.5-0.5B-Instruct` answers to `"model": "Qwen/Qwen2.5-0.5B-Instruct"`.
    """
    if model_id == family.name:
        return None
    if len(family.models) == 1 and model_id == family.config.models[family.config.base].path:
        return None
    single = single_model_ids(family)
    if model_id in single:
        return single[model_id]
    raise not_found_model(model_id, model_ids(family))


def normalise_knobs(family: Any, knobs: dict[str, float], allow_negative: bool) -> dict[str, float]:
    cfg = family.config
    experts = list(cfg.experts)
    max_weight = float(getattr(cfg, "max_weight", 4.0))
    out: dict[str, float] = {}
    for key, value in knobs.items():
        name = key
        if key not in experts and KNOB_ALIASES.get(key) in experts:
            name = KNOB_ALIASES[key]
            if name in knobs:
                raise bad_request(
                    f"eft.{key} is an alias of eft.{name}; give only one of them",
                    param=f"eft.{key}",
                )
        param = f"eft.{key}"
        if name in experts:
            if value < 0 and not allow_negative:
                raise bad_request(
                    f"{param} must be >= 0: negative expert weights invert a fine-tuning and "
                    "are refused unless the server runs with --allow-negative-weights",
                    param=param,
                )
            if abs(value) > max_weight:
                raise bad_request(
                    f"{param} must be at most {max_weight:g} in magnitude", param=param
                )
        elif name in FILTER_BOUNDS:
            lo, lo_inc, hi, hi_inc = FILTER_BOUNDS[name]
            ok = (value >= lo if lo_inc else value > lo) and (value <= hi if hi_inc else value < hi)
            if not ok:
                interval = f"{'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"
                raise bad_request(f"{param} must be in {interval}", param=param)
        else:
            valid = [
                *experts,
                *(a for a, t in KNOB_ALIASES.items() if t in experts),
                *FILTER_BOUNDS,
            ]
            raise bad_request(
                f"{param}: unknown knob; this family's knobs are {', '.join(valid)}", param=param
            )
        out[name] = value
    return out


def build_composition(
    family: Any, model_id: str, knobs: dict[str, float] | None, allow_negative: bool
) -> Composition:
    model = resolve_model(family, model_id)
    knobs = knobs or {}
    if model is not None and knobs:
        raise bad_request(
            f"eft: knobs apply to the EFT composition `{family.name}`, not to the single model "
            f"`{model_id}`",
            param="eft",
        )
    if model is None:
        knobs = normalise_knobs(family, knobs, allow_negative)
    try:
        return make_composition(family, model=model, knobs=knobs, allow_negative=allow_negative)
    except RequestValidationError as exc:
        raise bad_request(exc.message, param=exc.param or "eft") from exc
