"""`privacy-ops notify breach|policy`: breach notification and policy-change notices, run by hand.

Registered in privacy_ops/cli.py as a sub-app (`python -m privacy_ops.cli_notify` runs it on its own). Prefect is
imported inside the commands. Input is checked by the flows' own parameter models before anything starts: bad
input prints one line, is recorded in the audit log, and exits 1; so does a notice the flow rejects (nobody
affected, an unknown table, a rerun with different content). Output is counts and ids only.
"""

from __future__ import annotations

import os
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pydantic import ValidationError

notify_app = typer.Typer(
    help="Notices to many people: personal data breaches (policy section 3) and policy changes (section 9).",
    no_args_is_help=True,
)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _point_prefect_at_stack() -> None:
    """Before Prefect is imported: the local stack's Prefect server unless PREFECT_API_URL is set."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from privacy_ops.stack import prefect_env, read_stack

    info = read_stack()
    if info is not None and info.prefect_api_url:
        os.environ.update(prefect_env(info))


def _problems(error: ValidationError) -> list[str]:
    """Field and rule per problem (pydantic's messages name the rule, not the value given)."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return problems


def _refuse(kind: str, problems: list[str]) -> typer.Exit:
    """Print the problems and record the refusal in the audit log (best effort: the input may be all we have)."""
    from privacy_ops.notices import record_invalid_input
    from privacy_ops.services import services

    line = "; ".join(problems)
    try:
        record_invalid_input(services().engine, kind, problems)
    except Exception as error:  # the answer to the operator matters more than the record
        line += f" (not recorded in the audit log: {type(error).__name__})"
    return _fail(line)


def _account_ids(given: list[int] | None, path: Path | None) -> list[int]:
    ids = list(given or [])
    if path is None:
        return ids
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise _fail(f"--accounts-file: cannot read {path} ({type(error).__name__})") from None
    for number, line in enumerate(lines, start=1):
        value = line.split("#", 1)[0].strip()
        if not value:
            continue
        if not value.isdigit():
            raise _fail(f"--accounts-file: line {number} is not an account id")
        ids.append(int(value))
    return ids


def _run(flow_fn: Any, params: Any) -> dict[str, Any]:
    from privacy_ops.lifecycle.notify import NotificationError
    from privacy_ops.notices import NoticeBusy, NoticeError

    try:
        result: dict[str, Any] = flow_fn(params)
    except (NoticeError, NoticeBusy, NotificationError) as error:
        raise _fail(str(error)) from None
    return result


def _deliveries(result: dict[str, Any]) -> None:
    counts, this_run = result["deliveries"], result["this_run"]
    typer.echo(
        f"this run: {this_run['sent']} sent in {this_run['batches']} batches, {this_run['failed']} refused; "
        f"in all: {counts['sent']} sent, {counts['unconfirmed']} unconfirmed, {counts['failed']} refused, "
        f"{counts['no_address']} without address, {counts['not_active']} no longer active"
    )
    if counts["unconfirmed"]:
        typer.echo(
            f"{counts['unconfirmed']} unconfirmed: being handed to the mail server when a run died; maybe "
            "delivered, never resent (privacy_ops.notice_deliveries)"
        )


@notify_app.command("breach")
def breach(
    breach_id: Annotated[str, typer.Option(help="Incident reference (a-z, 0-9, '-'); rerun with it to resume")],
    description: Annotated[str, typer.Option(help="What happened; every affected person reads it")],
    detected_at: Annotated[str, typer.Option(help="When we became aware, ISO 8601 (UTC unless a zone is given)")],
    consequences: Annotated[str, typer.Option(help="The likely consequences for the people affected")],
    measures: Annotated[str, typer.Option(help="Measures taken or proposed")],
    advice: Annotated[str | None, typer.Option(help="What people can do to protect themselves")] = None,
    account_id: Annotated[
        list[int] | None, typer.Option("--account-id", help="An affected account (repeat)")
    ] = None,
    accounts_file: Annotated[Path | None, typer.Option(help="Affected account ids, one per line")] = None,
    category: Annotated[
        list[str] | None, typer.Option("--category", help="A category of personal data involved (repeat)")
    ] = None,
    table: Annotated[list[str] | None, typer.Option("--table", help="A data map table involved (repeat)")] = None,
    batch_size: Annotated[int, typer.Option(help="Recipients per batch")] = 200,
    rate: Annotated[float, typer.Option(help="At most this many emails per second")] = 20.0,
    requested_by: Annotated[str, typer.Option(help="Who starts it")] = "compliance-ops",
) -> None:
    """Notify everyone a personal data breach affects (once each); summarise it for the supervisory authority."""
    from pydantic import ValidationError

    from privacy_ops.notices import BreachNotice

    try:
        detected = datetime.fromisoformat(detected_at)
    except ValueError:
        raise _refuse("breach", ["detected_at: not an ISO 8601 date and time"]) from None
    try:
        params = BreachNotice.model_validate(
            {
                "breach_id": breach_id,
                "description": description,
                "detected_at": detected,
                "likely_consequences": consequences,
                "measures_taken": measures,
                "advice": advice,
                "account_ids": _account_ids(account_id, accounts_file),
                "categories": category or [],
                "tables": table or [],
                "batch_size": batch_size,
                "rate_per_second": rate,
                "requested_by": requested_by,
            }
        )
    except ValidationError as error:
        raise _refuse("breach", _problems(error)) from None
    _point_prefect_at_stack()
    from flows.breach_notice import breach_notice

    result = _run(breach_notice, params)
    typer.echo(
        f"{result['notice']}: {result['people']} people, {result['records']} records "
        f"({', '.join(result['categories'])}); supervisory authority by {result['authority_deadline']} "
        f"(summary to compliance ops {result['authority_summary'].replace('_', ' ')})"
    )
    _deliveries(result)


@notify_app.command("policy")
def policy(
    version: Annotated[str, typer.Option(help="The new version: its 'Last updated' date, YYYY-MM-DD[.N]")],
    effective_on: Annotated[str, typer.Option(help="The day it takes effect, YYYY-MM-DD")],
    changes: Annotated[str, typer.Option(help="What changes, in plain language")],
    policy_url: Annotated[
        str, typer.Option(help="Where the new policy is published")
    ] = "https://cellcms.com/privacy",
    batch_size: Annotated[int, typer.Option(help="Recipients per batch")] = 200,
    rate: Annotated[float, typer.Option(help="At most this many emails per second")] = 20.0,
    requested_by: Annotated[str, typer.Option(help="Who starts it")] = "compliance-ops",
) -> None:
    """Tell every active account about a new privacy policy version (once per account and version)."""
    from pydantic import ValidationError

    from privacy_ops.notices import PolicyNotice

    try:
        effective = date.fromisoformat(effective_on)
    except ValueError:
        raise _refuse("policy", ["effective_on: not a date (YYYY-MM-DD)"]) from None
    try:
        params = PolicyNotice(
            version=version,
            effective_on=effective,
            changes=changes,
            policy_url=policy_url,
            batch_size=batch_size,
            rate_per_second=rate,
            requested_by=requested_by,
        )
    except ValidationError as error:
        raise _refuse("policy", _problems(error)) from None
    _point_prefect_at_stack()
    from flows.policy_notice import policy_notice

    result = _run(policy_notice, params)
    typer.echo(f"{result['notice']}: {result['people']} active accounts")
    _deliveries(result)


if __name__ == "__main__":
    notify_app(prog_name="privacy-ops notify")
