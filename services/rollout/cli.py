"""`sluice rollout`: start, watch and steer rollouts through the controller's operator API.

The API's address comes from `--url` or `SLUICE_ROLLOUT_URL` (default http://127.0.0.1:8082), the
key from `--api-key` or `SLUICE_ROLLOUT_API_KEY`. A refused request exits with code 2 and prints
`error [code]: message` (and, for an invalid plan, every problem with its path); an unreachable
controller exits with code 1. `--json` prints the API's answer as it is.
"""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.rollout.client import DEFAULT_URL, RolloutApiError, RolloutClient
from services.rollout.views import CommandResult, GateView, RolloutView

app = typer.Typer(help="Progressive delivery: shadow, canary, A/B, promotion and rollback.",
                  no_args_is_help=True)  # fmt: skip
console = Console()

Model = Annotated[str, typer.Argument(help="The model whose rollout to act on.")]
Reason = Annotated[str, typer.Option(help="Why; recorded with the decision.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]


@app.callback()
def connection(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="SLUICE_ROLLOUT_URL", help="Operator API of the controller.")
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None, typer.Option(envvar="SLUICE_ROLLOUT_API_KEY", help="API key (admin to act).")
    ] = None,
) -> None:
    """Where the rollout controller listens."""
    ctx.obj = RolloutClient(url, api_key)


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def _fail(error: RolloutApiError) -> typer.Exit:
    typer.echo(f"error [{error.code}]: {error.message}", err=True)
    if isinstance(error.details, list):
        for problem in error.details:
            if isinstance(problem, dict):
                typer.echo(f"  {problem.get('loc') or '(plan)'}: {problem.get('msg')}", err=True)
    return typer.Exit(1 if error.code == "unreachable" else 2)


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _gates_table(gates: list[GateView], title: str) -> Table:
    table = Table(title=title)
    for column in ("gate", "value", "threshold", "samples", "status", "note"):
        table.add_column(column)
    styles = {"pass": "green", "fail": "bold red", "insufficient": "yellow"}
    for gate in gates:
        style = styles.get(gate.status, "")
        status = f"[{style}]{gate.status}[/{style}]" if style else gate.status
        table.add_row(
            gate.name, _number(gate.value), _number(gate.threshold), str(gate.samples), status,
            gate.note,
        )  # fmt: skip
    return table


def _show(view: RolloutView) -> None:
    weights = ", ".join(f"v{version} {weight:.0%}" for version, weight in view.weights.items())
    if view.shadow_sample_rate:
        weights += f"; shadow v{view.candidate} {view.shadow_sample_rate:.0%} sampled"
    step = f"step {view.step_index + 1} of {view.steps}" if view.step_index >= 0 else "no step"
    if view.phase in ("promoted", "rolled_back", "aborted"):
        step = f"finished in {step}"
    console.print(f"[bold]{view.model}[/bold] rollout {view.rollout_id}: v{view.champion} -> "
                  f"v{view.candidate}")  # fmt: skip
    console.print(f"  state     {view.state} ({step}), since {_time(view.step_started_ms)}")
    console.print(f"  weights   {weights} (routing revision {view.revision}"
                  + (", not acked yet)" if view.routing_pending else ")"))  # fmt: skip
    console.print(f"  failures  {view.consecutive_failures} of {view.failure_threshold} "
                  f"-> {view.on_failure}")  # fmt: skip
    console.print(f"  reason    {view.reason}")
    if view.gates:
        console.print(_gates_table(view.gates, f"gates (last decision: {view.last_action})"))


def _run_command(ctx: typer.Context, model: str, order: str, reason: str, as_json: bool) -> None:
    try:
        result: CommandResult = ctx.obj.command(model, order, actor=_actor(), reason=reason)
    except RolloutApiError as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    console.print(f"{result.action}: {result.reason}")
    _show(result.rollout)


@app.command()
def start(
    ctx: typer.Context,
    plan: Annotated[Path, typer.Argument(help="The rollout plan (YAML).", exists=True)],
    as_json: AsJson = False,
) -> None:
    """Start a rollout from a plan file; its first step is live when this returns."""
    try:
        result: CommandResult = ctx.obj.start(plan.read_text(), str(plan), actor=_actor())
    except RolloutApiError as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
        return
    console.print(f"{result.action}: {result.reason}")
    _show(result.rollout)


@app.command()
def status(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="One model; all when left out.")] = None,
    as_json: AsJson = False,
) -> None:
    """Current step, weights, and gate values against their thresholds."""
    try:
        views = [ctx.obj.status(model)] if model else ctx.obj.list()
    except RolloutApiError as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(json.dumps([v.model_dump(mode="json") for v in views], indent=2))
        return
    if not views:
        console.print("no rollouts")
    for view in views:
        _show(view)


@app.command()
def pause(ctx: typer.Context, model: Model, reason: Reason = "", as_json: AsJson = False) -> None:
    """Hold the current traffic split; gates are not evaluated until resumed."""
    _run_command(ctx, model, "pause", reason, as_json)


@app.command()
def resume(ctx: typer.Context, model: Model, reason: Reason = "", as_json: AsJson = False) -> None:
    """Continue a paused rollout; the step's clock restarts."""
    _run_command(ctx, model, "resume", reason, as_json)


@app.command()
def promote(ctx: typer.Context, model: Model, reason: Reason = "", as_json: AsJson = False) -> None:
    """Make the candidate the champion now, skipping the remaining steps."""
    _run_command(ctx, model, "promote", reason, as_json)


@app.command()
def abort(ctx: typer.Context, model: Model, reason: Reason = "", as_json: AsJson = False) -> None:
    """Roll back: everyone is served by the champion again."""
    _run_command(ctx, model, "abort", reason, as_json)


app.command("rollback", help="Same as abort.")(abort)


@app.command()
def history(
    ctx: typer.Context,
    model: Model,
    rollout_id: Annotated[str | None, typer.Option(help="Only this rollout.")] = None,
    limit: Annotated[int, typer.Option(help="Most decisions shown.")] = 50,
    as_json: AsJson = False,
) -> None:
    """Recorded decisions with the evidence that drove them, newest first."""
    try:
        decisions = ctx.obj.history(model, rollout_id, limit)
    except RolloutApiError as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(json.dumps([d.model_dump(mode="json") for d in decisions], indent=2))
        return
    table = Table(title=f"decisions of {model}")
    for column in ("time (UTC)", "rollout", "action", "state", "by", "reason"):
        table.add_column(column)
    for d in decisions:
        table.add_row(
            _time(d.decided_at_ms), d.rollout_id, d.action,
            f"{d.state_before} -> {d.state_after}", d.actor, d.reason,
        )  # fmt: skip
    console.print(table)
