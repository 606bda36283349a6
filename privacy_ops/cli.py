"""`privacy-ops`: the command line of CellCMS Privacy Ops.

One typer app; each area is a sub-app (`privacy-ops stack ...`). Keep imports here light: Prefect (~1.5 s) and
Great Expectations (~5.5 s) are imported inside the commands that need them. Expected failures (ConfigError,
StackError) are printed by `main()` as one line on stderr with exit code 1, never as a traceback.
"""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from privacy_ops.settings import ConfigError, state_dir
from privacy_ops.stack import (
    SERVICES,
    START_TIMEOUT,
    STOP_TIMEOUT,
    StackError,
    StackInfo,
    prefect_env,
    read_stack,
    stack_status,
    start_stack,
    stop_stack,
)

app = typer.Typer(
    name="privacy-ops",
    help="GDPR/CCPA privacy operations for CellCMS, run as Prefect flows.",
    no_args_is_help=True,
    add_completion=False,
    # Locals in a traceback would print settings, i.e. passwords and keys.
    pretty_exceptions_show_locals=False,
)

stack_app = typer.Typer(
    help=(
        "The local stack: real PostgreSQL, S3 (moto), Stripe (localstripe), SMTP sink and Prefect servers on "
        "127.0.0.1, for development and tests. A service whose address is set in the environment "
        "(CELLCMS_DATABASE_URL, CELLCMS_S3_ENDPOINT_URL, STRIPE_API_BASE, SMTP_HOST, PREFECT_API_URL) is used "
        "as is and not started. State lives in $PRIVACY_OPS_HOME (default .privacy-ops/)."
    ),
    short_help="Start, stop and inspect the local stand-in servers.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")

ServiceOption = Annotated[
    list[str] | None,
    typer.Option(
        "--service",
        "-s",
        help=f"Only this service; repeat for several ({', '.join(SERVICES)}). Default: all.",
        show_default=False,
    ),
]


def _print_status() -> None:
    """One line per service, then where the Prefect UI and the state are."""
    rows = stack_status()
    if all(row.state == "off" for row in rows):
        typer.echo(f"no local stack running (state: {state_dir()})")
        return
    for row in rows:
        detail = ""
        if row.state in ("up", "stray") and row.pid:
            detail = f"pid {row.pid}"
        elif row.state == "down":
            detail = f"process gone; log: {row.log}" if row.log else "process gone"
        typer.echo(f"{row.name:<9} {row.state:<9} {row.url:<40} {detail}".rstrip())
    prefect = next(row for row in rows if row.name == "prefect")
    if prefect.state == "up":
        typer.echo(f"Prefect UI: {prefect.url}")
    if any(row.state in ("down", "stray") for row in rows):
        typer.echo("some services are not running: `privacy-ops stack up` restarts them, `stack down` cleans up")
    typer.echo(f"state: {state_dir()}")


def _any_external(info: StackInfo) -> bool:
    return any(svc.external for svc in info.services.values())


@stack_app.command("up")
def stack_up(
    service: ServiceOption = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the services to become ready.")
    ] = START_TIMEOUT,
) -> None:
    """Start the local stack and wait until every service answers. Already running: just report it."""
    info = start_stack(service, timeout=timeout, progress=typer.echo)
    if not info.started:
        typer.echo("nothing to start: already running" + (" or external" if _any_external(info) else ""))
    _print_status()


@stack_app.command("down")
def stack_down(
    wipe: Annotated[
        bool,
        typer.Option("--wipe", help="Also delete the data: database, Prefect history, mail, secret key, logs."),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a graceful stop before killing.")
    ] = STOP_TIMEOUT,
) -> None:
    """Stop every service of the local stack and wait until their ports are free. Data is kept unless --wipe."""
    stopped = stop_stack(wipe=wipe, timeout=timeout, progress=typer.echo)
    typer.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    if wipe:
        typer.echo(f"wiped {state_dir()}")


@stack_app.command("status")
def stack_status_command() -> None:
    """Show each service of the local stack: up, down, external or off, and its address."""
    _print_status()


@stack_app.command("env")
def stack_env() -> None:
    """Print `export` lines pointing Prefect at the stack: eval "$(privacy-ops stack env)"."""
    for name, value in prefect_env(read_stack()).items():
        typer.echo(f"export {name}={shlex.quote(value)}")


def main() -> None:
    """Console entry point: run the app; expected failures become one line on stderr and exit code 1."""
    try:
        app(prog_name="privacy-ops")
    except (ConfigError, StackError) as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
