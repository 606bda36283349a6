"""`privacy-ops up` and `privacy-ops down`: the whole local installation (stack, blocks, deployments, one worker).

Added to the main app by `register(app)` in `privacy_ops.cli`. The logic lives in `privacy_ops.operations`.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from privacy_ops.cli_options import StopTimeoutOption, WipeOption
from privacy_ops.stack import START_TIMEOUT, STOP_TIMEOUT, prefect_home


def up_command(
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the services to become ready.")
    ] = START_TIMEOUT,
) -> None:
    """Start everything locally: the stack (with the Prefect server and UI), the blocks, every deployment and one
    process worker for the privacy-ops pool. Already up: just report it."""
    if "prefect" not in sys.modules and not os.environ.get("PREFECT_API_URL"):
        # Before Prefect is imported: its client keeps its profile and caches with the stack, not in ~/.prefect.
        os.environ.setdefault("PREFECT_HOME", str(prefect_home()))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from privacy_ops.operations import up

    result = up(timeout=timeout, progress=typer.echo)
    if result.already_up:
        typer.echo(f"already up: worker pid {result.worker.pid} polling the {result.worker.pool} pool")
    else:
        for name in result.deployments:
            typer.echo(f"deployed {name}")
        if result.worker_started:
            typer.echo(
                f"worker pid {result.worker.pid} polling the {result.worker.pool} pool (log: {result.worker.log})"
            )
    typer.echo(f"Prefect UI: {result.ui_url}")
    typer.echo("stop everything with `privacy-ops down`")


def down_command(
    wipe: WipeOption = False,
    timeout: StopTimeoutOption = STOP_TIMEOUT,
) -> None:
    """Stop the worker, then every service of the local stack; leaves no process and no listening port."""
    from privacy_ops.operations import down

    result = down(wipe=wipe, timeout=timeout, progress=typer.echo)
    parts = (["worker"] if result.worker_stopped else []) + result.services
    typer.echo(f"stopped {', '.join(parts)}" if parts else "nothing was running")


def register(app: typer.Typer) -> None:
    """Add `up` and `down` to the main app."""
    app.command("up")(up_command)
    app.command("down")(down_command)
