"""`privacy-ops retention run` and `privacy-ops hold add|lift|list`: nightly retention by hand, and legal holds.

Registered in privacy_ops/cli.py as sub-apps. Prefect and Great Expectations are imported inside the commands.
Expected failures (bad input, a hold on an unknown account, an approval needed) print one line and exit 1.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated

import typer

retention_app = typer.Typer(
    help="Nightly retention: every time limit of the privacy policy.", no_args_is_help=True
)
holds_app = typer.Typer(help="Legal holds: accounts or rows retention must not touch.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@retention_app.command("run")
def run(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would change; change nothing")] = False,
    as_of: Annotated[str | None, typer.Option(help="The run's date, YYYY-MM-DD (default today)")] = None,
    rule: Annotated[list[str] | None, typer.Option("--rule", help="A rule to include (repeatable)")] = None,
    max_share: Annotated[float, typer.Option(help="Share of a table above which a rule waits for approval")] = 0.2,
) -> None:
    """Run the nightly retention flow now (locally); prints counts per rule and store."""
    from pydantic import ValidationError

    from privacy_ops.retention import RetentionError

    try:
        day = date.fromisoformat(as_of) if as_of else None
    except ValueError:
        raise _fail(f"--as-of: not a date (YYYY-MM-DD): {as_of!r}") from None
    from flows.nightly_retention import RetentionRun, nightly_retention

    try:
        params = RetentionRun(rules=rule or [], dry_run=dry_run, as_of=day, max_share=max_share)
        reports = nightly_retention(params)
    except ValidationError as error:
        raise _fail("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors())) from None
    except RetentionError as error:
        raise _fail(str(error)) from None
    typer.echo(f"{'rule':34} {'selected':>9} {'postgres':>9} {'s3':>6} {'stripe':>7} {'email':>6}")
    for report in reports:
        stores = report["stores"]
        typer.echo(
            f"{report['rule']:34} {report['selected']:>9} {stores['postgres']:>9} {stores['s3']:>6} "
            f"{stores['stripe']:>7} {stores['email']:>6}"
        )


@holds_app.command("add")
def add(
    reason: Annotated[str, typer.Option(help="Why (a case or audit reference; no personal data)")],
    placed_by: Annotated[str, typer.Option(help="Who places the hold")],
    account_id: Annotated[int | None, typer.Option(help="Hold a whole account")] = None,
    table: Annotated[str | None, typer.Option(help="Or hold one row of this table ...")] = None,
    row_key: Annotated[str | None, typer.Option(help="... by its primary key ('a,b' for composite keys)")] = None,
) -> None:
    """Place a legal hold; prints its id."""
    from privacy_ops.lifecycle import holds
    from privacy_ops.services import services

    s = services()
    try:
        with s.engine.begin() as connection:
            hold_id = holds.place_hold(
                connection,
                s.datamap,
                secret_key=s.secret_key,
                reason=reason,
                placed_by=placed_by,
                now=datetime.now(UTC),
                account_id=account_id,
                table=table,
                row_key=row_key,
            )
    except ValueError as error:  # HoldError, or personal data in reason/placed_by
        raise _fail(str(error)) from None
    typer.echo(f"legal hold {hold_id} placed")


@holds_app.command("lift")
def lift(
    hold_id: Annotated[int, typer.Argument(help="The hold's id")],
    lifted_by: Annotated[str, typer.Option(help="Who lifts it")],
) -> None:
    """Lift a legal hold: retention applies again from the next run."""
    from privacy_ops.lifecycle import holds
    from privacy_ops.services import services

    s = services()
    try:
        with s.engine.begin() as connection:
            holds.lift_hold(
                connection, secret_key=s.secret_key, hold_id=hold_id, lifted_by=lifted_by, now=datetime.now(UTC)
            )
    except ValueError as error:
        raise _fail(str(error)) from None
    typer.echo(f"legal hold {hold_id} lifted")


@holds_app.command("list")
def list_(all_: Annotated[bool, typer.Option("--all", help="Include lifted holds")] = False) -> None:
    """Legal holds (active ones unless --all)."""
    from privacy_ops.lifecycle import holds
    from privacy_ops.services import services

    with services().engine.connect() as connection:
        found = holds.list_holds(connection, active_only=not all_)
    for hold in found:
        target = (
            f"account {hold.account_id}" if hold.account_id is not None else f"{hold.table_name} {hold.row_key}"
        )
        lifted = f" lifted {hold.lifted_at:%Y-%m-%d}" if hold.lifted_at else ""
        typer.echo(
            f"{hold.id:>5}  {target:30} {hold.placed_at:%Y-%m-%d} by {hold.placed_by}: {hold.reason}{lifted}"
        )
