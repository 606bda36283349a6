"""`privacy-ops watchdog run` and `privacy-ops hygiene run`: the daily operations jobs, run by hand.

Registered in privacy_ops/cli.py as sub-apps. Prefect is imported inside the commands (it costs ~1.5 s). Both
print counts and request ids only; bad input prints one line and exits 1.
"""

from __future__ import annotations

import os
from datetime import date
from typing import Annotated

import typer

watchdog_app = typer.Typer(
    help="Deadline watchdog: requests due within 7 days and overdue ones.", no_args_is_help=True
)
hygiene_app = typer.Typer(
    help="Orchestrator hygiene: delete finished request flow runs from Prefect.", no_args_is_help=True
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _point_prefect_at_stack() -> None:
    """Before Prefect is imported: use the local stack's Prefect server unless PREFECT_API_URL is set (as the
    request commands do), so runs and their deletions happen on the server the operator looks at."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from privacy_ops.stack import prefect_env, read_stack

    info = read_stack()
    if info is not None and info.prefect_api_url:
        os.environ.update(prefect_env(info))


def _problems(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors())
    return str(error)


@watchdog_app.command("run")
def watchdog_run(
    as_of: Annotated[str | None, typer.Option(help="The day to check, YYYY-MM-DD (default today, UTC)")] = None,
) -> None:
    """Run the deadline watchdog now (locally): one summary email per day, an event per request."""
    from pydantic import ValidationError

    try:
        day = date.fromisoformat(as_of) if as_of else None
    except ValueError:
        raise _fail(f"--as-of: not a date (YYYY-MM-DD): {as_of!r}") from None
    _point_prefect_at_stack()
    from flows.deadline_watchdog import WatchdogRun, deadline_watchdog

    try:
        params = WatchdogRun(as_of=day)
    except ValidationError as error:
        raise _fail(_problems(error)) from None
    report = deadline_watchdog(params)
    typer.echo(
        f"as of {report['as_of']}: {report['overdue']} overdue, {report['due_soon']} due within 7 days; "
        f"summary email {report['email'].replace('_', ' ')}"
    )
    for request_id in report["requests"]:
        typer.echo(f"  {request_id}")


@hygiene_app.command("run")
def hygiene_run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be deleted")] = False,
    older_than_days: Annotated[
        int, typer.Option(help="Delete finished request runs that ended more than N days ago")
    ] = 30,
    batch_size: Annotated[int, typer.Option(help="Runs deleted per batch (1-200)")] = 100,
) -> None:
    """Delete finished access/erasure flow runs older than N days from Prefect (their logs go with them)."""
    from pydantic import ValidationError

    _point_prefect_at_stack()
    from flows.orchestrator_hygiene import HygieneRun, orchestrator_hygiene

    try:
        params = HygieneRun(older_than_days=older_than_days, dry_run=dry_run, batch_size=batch_size)
    except ValidationError as error:
        raise _fail(_problems(error)) from None
    report = orchestrator_hygiene(params)
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"{verb} {report['total']} finished request flow run(s) that ended before {report['cutoff']}")
    for flow_name, count in report["runs"].items():
        typer.echo(f"  {flow_name:<16} {count}")
