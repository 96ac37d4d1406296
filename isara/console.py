"""What every command shares: bad input becomes one clear message and exit code 1, never a traceback.

No click here (cli.py is the only module that imports it): `guard` raises UserError, which cli.py's commands turn
into click's "Error: <message>" and exit code 1.
"""

from __future__ import annotations

from isara.params import DEFAULT_PARAMS, StageParams, load_params, load_stage_params

# ConnectionError: an LLM server that died or stopped answering (isara.engines.server.ServerError names it).
EXPECTED_ERRORS = (ValueError, FileNotFoundError, LookupError, ConnectionError)


class UserError(Exception):
    """Bad input, already explained by its message (naming the file, line or param): no traceback."""


def guard(fn, *args, **kwargs):
    """Call fn; turn the errors bad input raises (each naming its file, line or param) into UserError."""
    try:
        return fn(*args, **kwargs)
    except EXPECTED_ERRORS as exc:
        raise UserError(str(exc)) from exc


def stage_params() -> StageParams:
    """Validate params.yaml before any work; under DVC, restrict to the sections the stage declares."""
    return guard(load_stage_params, DEFAULT_PARAMS)


def resolve_prev(iteration: str, prev: str | None) -> str:
    return prev if prev is not None else guard(load_params, DEFAULT_PARAMS).prev_of(iteration)


def echo_metrics(name: str, metrics: dict) -> None:
    flat = ", ".join(f"{k}={v}" for k, v in metrics.items() if not isinstance(v, (dict, list)))
    print(f"{name}: {flat}", flush=True)
