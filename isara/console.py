"""What every command shares: bad input becomes one clear message and exit code 1, never a traceback."""

from __future__ import annotations

import click

from isara.params import DEFAULT_PARAMS, StageParams, load_params, load_stage_params

EXPECTED_ERRORS = (ValueError, FileNotFoundError, LookupError)


class UserError(click.ClickException):
    def format_message(self) -> str:
        return self.message


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
    click.echo(f"{name}: {flat}")


iteration_argument = click.argument("iteration")
prev_option = click.option("--prev", default=None, help="Iteration to start from (default: params iterations.<t>.prev).")
