"""Command-line options shared by several commands (`stack down`, `down`)."""

from __future__ import annotations

from typing import Annotated

import typer

WipeOption = Annotated[
    bool,
    typer.Option("--wipe", help="Also delete the data: database, Prefect history, mail, secret key, logs."),
]
StopTimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for a graceful stop before killing.")]
