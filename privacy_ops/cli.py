"""`privacy-ops`: the command line of CellCMS Privacy Ops.

One typer app; each area is a sub-app (`privacy-ops stack ...`). Keep imports here light: Prefect (~1.5 s) and
Great Expectations (~5.5 s) are imported inside the commands that need them. Expected failures (ConfigError,
StackError) are printed by `main()` as one line on stderr with exit code 1, never as a traceback.
"""

from __future__ import annotations

import importlib
import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from privacy_ops.cli_notify import notify_app
from privacy_ops.cli_operations import hygiene_app, watchdog_app
from privacy_ops.cli_options import StopTimeoutOption, WipeOption
from privacy_ops.cli_retention import holds_app, retention_app
from privacy_ops.cli_up import register as register_up
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
register_up(app)

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
    wipe: WipeOption = False,
    timeout: StopTimeoutOption = STOP_TIMEOUT,
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


# ---------------------------------------------------------------------------------------------------------------
# Requests


def _point_prefect_at_stack() -> None:
    """Before Prefect is imported: use the local stack's Prefect server unless PREFECT_API_URL is set."""
    if os.environ.get("PREFECT_API_URL"):
        return
    info = read_stack()
    if info is not None and info.prefect_api_url:
        os.environ.update(prefect_env(info))


request_app = typer.Typer(
    help=(
        "Start a privacy request and follow it to the end in this terminal. The flow emails a one-time code to "
        "the address on file and waits; enter it from another terminal with `privacy-ops verify REQUEST_ID CODE` "
        "(or the Prefect UI's resume form)."
    ),
    short_help="Start a privacy request of any right (access, erasure, rectification, restriction, ...).",
    no_args_is_help=True,
)
app.add_typer(request_app, name="request")

EmailOption = Annotated[str | None, typer.Option("--email", help="The requester's email address.")]
AccountOption = Annotated[int | None, typer.Option("--account-id", help="Or the CellCMS account id.")]
RegulationOption = Annotated[str, typer.Option("--regulation", help="GDPR (30-day deadline) or CCPA (45 days).")]
ByOption = Annotated[str, typer.Option("--requested-by", help="Who took the request.")]
ResumeOption = Annotated[
    str | None, typer.Option("--resume", help="Continue an existing request (e.g. after a failure) instead.")
]


# Each right's flow, imported only when its command runs (Prefect and GX are slow to import).
REQUEST_FLOWS = {
    "access": "flows.access_request:access_request",
    "erasure": "flows.erasure_request:erasure_request",
    "restriction": "flows.restriction_request:restriction_request",
    "objection": "flows.objection_request:objection_request",
    "opt_out": "flows.opt_out_request:opt_out_request",
    "portability": "flows.portability_request:portability_request",
    "know": "flows.know_request:know_request",
    "rectification": "flows.rectification_request:rectification_request",
}


def _flow(reference: str) -> Any:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def _validated(model: Any, values: dict[str, Any]) -> Any:
    """A flow parameter model from command-line values; a bad value is a usage error, not a traceback."""
    from pydantic import ValidationError

    try:
        return model.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in error.errors())
        raise typer.BadParameter(problems) from None


def _run_request(
    right: str,
    email: str | None,
    account_id: int | None,
    regulation: str,
    requested_by: str,
    resume: str | None,
    **parameters: Any,
) -> None:
    _point_prefect_at_stack()
    from flows.parameters import SubjectIntake

    intake = None
    if resume is None:
        intake = _validated(
            SubjectIntake,
            {"email": email, "account_id": account_id, "regulation": regulation, "requested_by": requested_by},
        )
    flow_fn = _flow(REQUEST_FLOWS[right])
    typer.echo(f"starting the {right} request; the request id appears below once it is registered")
    status = flow_fn(intake=intake, resume_request_id=resume, **parameters)
    typer.echo(f"request finished: {status}")


@request_app.command("access")
def request_access(
    email: EmailOption = None,
    account_id: AccountOption = None,
    regulation: RegulationOption = "GDPR",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
) -> None:
    """Right of access / right to know: a copy of everything mapped, delivered as a link that expires."""
    _run_request("access", email, account_id, regulation, requested_by, resume)


@request_app.command("erasure")
def request_erasure(
    email: EmailOption = None,
    account_id: AccountOption = None,
    regulation: RegulationOption = "GDPR",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
) -> None:
    """Right to erasure / right to delete: remove everything the law lets us remove, and prove it."""
    _run_request("erasure", email, account_id, regulation, requested_by, resume)


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="FIELD=VALUE",
        help="A correction; repeat for several: --set full_name='Dana Roe' --set email=dana@example.org. FIELD is "
        "one of the data map's rectification fields; a new email is confirmed by a code sent to it.",
        show_default=False,
    ),
]


def parse_corrections(pairs: list[str]) -> dict[str, list[dict[str, str]]]:
    """`FIELD=VALUE` options as the flow's `corrections` parameter (split at the first '=')."""
    corrections = []
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name.strip():
            raise typer.BadParameter("each --set takes FIELD=VALUE, e.g. --set full_name='Dana Roe'")
        corrections.append({"field": name.strip(), "value": value})
    return {"corrections": corrections}


@request_app.command("rectification")
def request_rectification(
    email: EmailOption = None,
    account_id: AccountOption = None,
    set_: SetOption = None,
    regulation: RegulationOption = "GDPR",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
) -> None:
    """Right to rectification: correct the named fields everywhere the data map holds them.

    A new email address gets a second code, sent to it, entered with `privacy-ops verify` too. Refused and unknown
    fields are answered with the reason and change nothing.
    """
    corrections = None
    if resume is None:
        if not set_:
            raise typer.BadParameter("give at least one --set FIELD=VALUE")
        from privacy_ops.rectification import RectificationInput

        corrections = _validated(RectificationInput, parse_corrections(set_))
    elif set_ or email or account_id:
        raise typer.BadParameter(
            "--resume continues a request as it was made: give no --email, --account-id or --set"
        )
    _run_request("rectification", email, account_id, regulation, requested_by, resume, corrections=corrections)


@request_app.command("portability")
def request_portability(
    email: EmailOption = None,
    account_id: AccountOption = None,
    regulation: RegulationOption = "GDPR",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
) -> None:
    """Right to data portability: what the person provided (content, profile) as JSON, CSV and original files
    with a manifest another CMS can import, delivered as a link that expires."""
    _run_request("portability", email, account_id, regulation, requested_by, resume)


@request_app.command("know")
def request_know(
    email: EmailOption = None,
    account_id: AccountOption = None,
    regulation: RegulationOption = "CCPA",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
) -> None:
    """CCPA right to know: the categories held (sources, purposes, recipients) and the specific pieces collected
    in the 12 months before the request, delivered as a link that expires."""
    _run_request("know", email, account_id, regulation, requested_by, resume)


@request_app.command("restriction")
def request_restriction(
    email: EmailOption = None,
    account_id: AccountOption = None,
    regulation: RegulationOption = "GDPR",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
) -> None:
    """Right to restriction: keep the data, take the account out of every restrictable processing."""
    _run_request("restriction", email, account_id, regulation, requested_by, resume)


@request_app.command("objection")
def request_objection(
    purpose: Annotated[
        list[str], typer.Option("--purpose", help="A purpose objected to, as the data map names it (repeatable).")
    ],
    email: EmailOption = None,
    account_id: AccountOption = None,
    regulation: RegulationOption = "GDPR",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
) -> None:
    """Right to object: stop the named purposes (analytics, marketing, product_research) and delete their data."""
    from flows.parameters import Objection

    objection = _validated(Objection, {"purposes": purpose})
    _run_request("objection", email, account_id, regulation, requested_by, resume, objection=objection)


@request_app.command("opt-out")
def request_opt_out(
    email: EmailOption = None,
    account_id: AccountOption = None,
    regulation: RegulationOption = "CCPA",
    requested_by: ByOption = "compliance-ops",
    resume: ResumeOption = None,
    gpc: Annotated[
        bool, typer.Option("--gpc", help="The request came as a Global Privacy Control signal.")
    ] = False,
) -> None:
    """CCPA opt-out of sale/sharing (CellCMS sells none): recorded, sharing flags switched off, no code asked."""
    _run_request("opt_out", email, account_id, regulation, requested_by, resume, global_privacy_control=gpc)


@request_app.command("lift-restriction")
def request_lift_restriction(
    request_id: Annotated[str, typer.Argument(help="The completed restriction request, e.g. req_1a2b3c4d5e.")],
    reason: Annotated[str, typer.Option("--reason", help="Why it is lifted; told to the person.")],
    lifted_by: Annotated[str, typer.Option("--by", help="The operator lifting it.")],
) -> None:
    """Lift a restriction of processing: the person is told first, then it is lifted and recorded."""
    _point_prefect_at_stack()
    from flows.parameters import LiftRestriction

    lifting = _validated(
        LiftRestriction, {"restriction_request_id": request_id, "reason": reason, "lifted_by": lifted_by}
    )
    typer.echo(f"restriction of {request_id}: {_flow('flows.lift_restriction:lift_restriction')(lifting=lifting)}")


@app.command("verify")
def verify(
    request_id: Annotated[str, typer.Argument(help="The request id, e.g. req_1a2b3c4d5e.")],
    code: Annotated[str | None, typer.Argument(help="The 6-digit code the person received.")] = None,
    verified_by: Annotated[
        str | None,
        typer.Option("--verified-by", help="Record a verification done by other means, by this operator."),
    ] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="Mandatory with --verified-by: how.")] = None,
) -> None:
    """Enter a request's verification code, or record an operator's verification (--verified-by NAME --reason)."""
    _point_prefect_at_stack()
    from privacy_ops.lifecycle import audit, verification
    from privacy_ops.lifecycle.requests import Status, get_request, set_status
    from privacy_ops.rectification import awaiting_new_email_code, submit_new_email_code
    from privacy_ops.runner import continue_after_operator_verification, submit_code
    from privacy_ops.services import services

    svc = services()
    # A rectification's new email address is confirmed only by the code sent to it.
    new_email = awaiting_new_email_code(svc.engine, request_id)
    if verified_by is not None:
        if not reason:
            raise typer.BadParameter("--reason is required with --verified-by")
        if new_email:
            raise typer.BadParameter("a new email address is confirmed only by the code sent to it")
        with svc.engine.begin() as connection:
            request = get_request(connection, request_id)
            verification.record_operator_verification(
                connection, request_id=request_id, verified_by=verified_by, reason=reason, now=svc.now()
            )
            set_status(connection, request_id, Status.verified)
            audit.record(
                connection,
                step="verify",
                outcome="verified_by_operator",
                request_id=request_id,
                subject_hash=request.subject_hash,
                details={"operator": verified_by, "reason": reason},
            )
        outcome = continue_after_operator_verification(svc.engine, request_id)
        typer.echo(f"{request_id}: verified by {verified_by}; {outcome}")
        return
    if code is None:
        raise typer.BadParameter("give the CODE, or --verified-by NAME --reason TEXT")
    state = (submit_new_email_code if new_email else submit_code)(svc.engine, request_id, code)
    if state.status == verification.VerificationStatus.pending:
        typer.echo(f"{request_id}: wrong code, {state.attempts_left} attempt(s) left")
        raise typer.Exit(1)
    typer.echo(f"{request_id}: {state.status.value}")
    if state.status != verification.VerificationStatus.verified:
        raise typer.Exit(1)


@app.command("requests")
def list_requests_command(
    all_requests: Annotated[bool, typer.Option("--all", help="Include finished requests.")] = False,
) -> None:
    """List privacy requests with their status and days left before the deadline."""
    from privacy_ops.lifecycle.requests import list_requests
    from privacy_ops.services import services

    with services().engine.connect() as connection:
        rows = list_requests(connection, open_only=not all_requests)
    if not rows:
        typer.echo("no open requests" if not all_requests else "no requests")
    for r in rows:
        typer.echo(
            f"{r.id}  {r.right.value:<8} {r.regulation.value:<5} {r.status.value:<22} due {r.due_at:%Y-%m-%d} "
            f"({r.days_left} days left)"
        )


app.add_typer(notify_app, name="notify")
app.add_typer(retention_app, name="retention")
app.add_typer(holds_app, name="hold")
app.add_typer(watchdog_app, name="watchdog")
app.add_typer(hygiene_app, name="hygiene")

# ---------------------------------------------------------------------------------------------------------------
# Audit, data map, sandbox, blocks, demo

audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the chain: report any altered, deleted or reordered entry (exit 1 if the chain is broken)."""
    from privacy_ops.lifecycle import audit
    from privacy_ops.services import services

    with services().engine.connect() as connection:
        result = audit.verify(connection)
    if result.ok:
        typer.echo(f"audit log ok: {result.entries} entries, chain intact")
        return
    for problem in result.problems:
        typer.echo(problem, err=True)
    raise typer.Exit(1)


datamap_app = typer.Typer(help="The data map: where personal data lives in CellCMS.", no_args_is_help=True)
app.add_typer(datamap_app, name="datamap")


@datamap_app.command("check")
def datamap_check(
    path: Annotated[Path | None, typer.Argument(help="The data map YAML (default: the configured one).")] = None,
    live: Annotated[bool, typer.Option(help="Also check it against the live database.")] = True,
) -> None:
    """Validate the data map, and compare it with the live database; every problem at once, with file:line."""
    from privacy_ops.datamap import check_against_database, load_datamap
    from privacy_ops.settings import load_settings

    if path is None:
        path = load_settings().datamap_path
    datamap = load_datamap(path)
    typer.echo(f"{path}: {len(datamap.postgres.tables)} tables, {len(datamap.s3)} S3 location(s), valid")
    if live:
        from sqlalchemy import create_engine

        engine = create_engine(load_settings().database_url.get_secret_value(), hide_parameters=True)
        for warning in check_against_database(datamap, engine, path):
            typer.echo(f"warning: {warning}")
        typer.echo("matches the live database")


@app.command("seed")
def seed(
    accounts: Annotated[int, typer.Option(help="How many synthetic accounts.", min=1)] = 1000,
    seed_value: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same data.")] = 42,
    reset: Annotated[
        bool, typer.Option(help="Replace an existing sandbox (PostgreSQL rows, S3 files, Stripe).")
    ] = False,
) -> None:
    """Create the sandbox CellCMS schema (Alembic) and fill it with synthetic people (local stack only)."""
    from cellcms_sandbox.database import migrate
    from cellcms_sandbox.generator import seed_sandbox
    from privacy_ops.services import services

    svc = services()
    url = svc.settings.database_url.get_secret_value()
    migrate(url)
    report = seed_sandbox(
        url, svc.s3, svc.stripe, svc.settings.content_bucket, accounts, seed=seed_value, reset=reset, progress=True
    )
    typer.echo(report.summary())


blocks_app = typer.Typer(help="Prefect blocks holding the connections for deployed workers.", no_args_is_help=True)
app.add_typer(blocks_app, name="blocks")


@blocks_app.command("save")
def blocks_save(
    name: Annotated[
        str, typer.Option(help="Block document name; workers then run with PRIVACY_OPS_BLOCKS=NAME.")
    ] = "cellcms",
) -> None:
    """Save the current settings (environment or local stack) as Prefect blocks, secrets encrypted by Prefect."""
    _point_prefect_at_stack()
    from blocks.cellcms import save_blocks
    from privacy_ops.settings import load_settings

    for slug in save_blocks(load_settings(), name):
        typer.echo(f"saved {slug}")


@app.command("deploy")
def deploy(
    work_pool: Annotated[str, typer.Option(help="The process work pool (created if missing).")] = "privacy-ops",
) -> None:
    """Deploy every flow to the Prefect server; then run a worker: `prefect worker start --pool privacy-ops`."""
    _point_prefect_at_stack()
    from deployments.deploy import deploy_all

    for name in deploy_all(work_pool):
        typer.echo(f"deployed {name}")
    typer.echo(f"start a worker (from this directory): prefect worker start --pool {work_pool}")


@app.command("demo")
def demo(
    accounts: Annotated[int, typer.Option(help="How many synthetic accounts to seed.", min=20)] = 1000,
) -> None:
    """The main job on embedded defaults: start the stack, seed CellCMS, run a request of every right end to end
    (codes read from the SMTP sink), and report what was found, exported, erased, retained and stopped."""
    from privacy_ops.demo import run_demo

    run_demo(accounts, typer.echo)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that deserve one line, not a traceback: bad settings, a stack that will not start, a bad data
    map, an unknown request, an unreachable server. Their messages never carry personal data."""
    from privacy_ops.datamap import DataMapError
    from privacy_ops.lifecycle.notify import NotificationError
    from privacy_ops.lifecycle.requests import RequestNotFound
    from privacy_ops.runner import RunnerError
    from privacy_ops.stores.errors import StoreError

    return (ConfigError, StackError, DataMapError, RequestNotFound, RunnerError, NotificationError, StoreError)


def _unreachable(error: BaseException) -> str | None:
    """One line for a server that cannot be reached (database, S3, Stripe, SMTP), or None if it is not that."""
    from botocore.exceptions import EndpointConnectionError
    from sqlalchemy.exc import OperationalError
    from stripe import APIConnectionError

    if isinstance(error, OperationalError):
        reason = str(error.orig).strip().splitlines()[0] if error.orig else "unreachable"
        return f"cannot reach the CellCMS database (CELLCMS_DATABASE_URL): {reason}"
    if isinstance(error, EndpointConnectionError):
        return "cannot reach S3 (CELLCMS_S3_ENDPOINT_URL): connection failed"
    if isinstance(error, APIConnectionError):
        return "cannot reach Stripe (STRIPE_API_BASE): connection failed"
    if isinstance(error, (ConnectionError, TimeoutError)):
        return f"a server could not be reached: {error.__class__.__name__}"
    return None


def main() -> None:
    """Console entry point: run the app; expected failures become one line on stderr and exit code 1."""
    try:
        app(prog_name="privacy-ops")
    except _expected_errors() as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(1) from None
    except Exception as error:
        line = _unreachable(error)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
