"""The Prefect UI as the compliance console, in a real headless browser (Playwright + Debian's Chromium).

From a stack brought up like `privacy-ops up` (in its own PRIVACY_OPS_HOME, with a real process worker that reads
its connections from the saved Prefect blocks, as a deployed worker does), two tests drive the UI:

1. an erasure request started from the deployment's form, the code (read from the SMTP sink, as the person reads
   it) entered in the suspended run's resume form, the run completed, then the request, the data and the artifact;
2. the same, but S3 is unreachable for the worker when the run resumes (its storage block points at a loopback
   port that refuses connections), so the run fails at the S3 step after PostgreSQL was erased; S3 is restored,
   the UI's Retry reschedules the same run, and it completes without redoing a finished step or sending an email
   twice.

Screenshots of every step land in test-output/ui/<test>/ with `timings.txt` (seconds per step, and what happened
when); a failing step saves `FAILED-<step>.png` and the worker's and Prefect server's logs there, and its error
names the step, the run's state and the end of the worker's log.

Waits are explicit and bounded: Prefect's API decides when a run reached a state (polled), the page is then
reloaded until its state badge shows it (the UI shows what it fetched), menus are reopened when they rendered
before the run's state arrived, and the API's answer to each form is checked. The stack's Prefect server keeps
its data in SQLite, which answers 503 while busy (2 shared cores, the scheduler, the worker's polls, flow-run
logs): the UI then only shows an error toast, so the test clicks again, as a person would. That 503 on the
custom-run form, followed by a 60 s wait for the "View run" toast that never came, was the earlier flakiness.

Chromium comes from Debian (`./dev test` installs it when missing, as root); `playwright install` is never used.
Every request that does not go to 127.0.0.1 is aborted (the UI tries to reach an analytics host).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Engine, create_engine, text

from privacy_ops import operations
from privacy_ops.lifecycle import audit
from privacy_ops.lifecycle.notify import message_id_for
from privacy_ops.lifecycle.requests import Status
from privacy_ops.runner import code_from_mail, final_status
from privacy_ops.settings import ENVIRONMENT, PROJECT_ROOT, Settings, load_settings, state_dir
from privacy_ops.stack import read_mail
from privacy_ops.stores import stripe_store
from tests.test_up_down import FAST, _seed

pytest.importorskip("playwright")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = PROJECT_ROOT / "test-output" / "ui"
ACCOUNT = 15  # an ordinary seeded account (1..10 carry the hard cases, 21..24 the retention ones)
SEEDED = 30

# Bounded waits, generous for 2 shared cores. A flow run's process imports Prefect and our stores (~5-15 s), the
# worker polls every second (FAST), and Great Expectations adds ~6 s of imports to the check step.
UI_TIMEOUT_MS = 30_000  # any single UI action or element
SUSPEND_TIMEOUT = 240.0  # trigger -> suspended, waiting for the code
FINISH_TIMEOUT = 300.0  # resumed or retried -> a final state (the failing S3 step retries with backoff first)
BADGE_TIMEOUT = 60.0  # the API says the state is reached -> the page shows it
SEND_ATTEMPTS = 4  # clicks on a button whose request the server answered 503 (SQLite busy)

if not CHROMIUM.exists() and os.geteuid() != 0:
    pytest.skip(
        f"browser tests need Debian's Chromium at {CHROMIUM}; not root, so it cannot be installed here "
        "(as root `./dev test` runs `apt-get install chromium`)",
        allow_module_level=True,
    )

pytestmark = [
    pytest.mark.timeout(900),  # each test, plus `up` (~30-60 s) for the first
    # pytest-playwright's own session fixtures trip a pytest 9 deprecation warning that is not ours to fix.
    pytest.mark.filterwarnings("ignore:Session-scoped fixtures defined as instance methods"),
]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    """pytest-playwright launches Debian's Chromium, headless, with no background network traffic."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `./dev test` (installs Debian's chromium as root)")
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS, "headless": True}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_context_args, "viewport": {"width": 1400, "height": 1000}}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[operations.UpResult]:
    """`privacy-ops up` in a fresh PRIVACY_OPS_HOME, seeded; everything stopped afterwards. The worker runs with
    PRIVACY_OPS_BLOCKS, so its flow runs take their connections from the saved blocks (README: deployed)."""
    home = tmp_path_factory.mktemp("ui") / "home"
    with pytest.MonkeyPatch.context() as patch:
        for variable in [*(v for v, _ in ENVIRONMENT.values()), "PREFECT_API_URL", "PRIVACY_OPS_BLOCKS"]:
            patch.delenv(variable, raising=False)
        patch.setenv("PRIVACY_OPS_HOME", str(home))
        # The worker polls every second; the scheduler keeps its default loop (no test here needs it fast, and
        # its writes compete with the UI's for the server's SQLite database).
        patch.setenv("PREFECT_WORKER_QUERY_SECONDS", FAST["PREFECT_WORKER_QUERY_SECONDS"])
        patch.setenv("PREFECT_SERVER_LOG_RETRYABLE_ERRORS", "true")  # the server logs why it answered 503
        try:
            result = operations.up(worker_env={"PRIVACY_OPS_BLOCKS": operations.BLOCKS_NAME})
            _seed(SEEDED)
            yield result
        finally:
            operations.down(wipe=True)


@pytest.fixture(scope="module")
def console_settings(console: operations.UpResult) -> Settings:
    return load_settings()


@pytest.fixture(scope="module")
def console_engine(console_settings: Settings) -> Iterator[Engine]:
    engine = create_engine(console_settings.database_url.get_secret_value(), pool_pre_ping=True)
    yield engine
    engine.dispose()


# --- Prefect API and the stores, read directly -------------------------------------------------------------------


def _flow_run(console: operations.UpResult, flow_run_id: str) -> Any:
    from prefect.client.orchestration import get_client

    with operations._prefect_at(console.stack), get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(flow_run_id))


def _task_runs(console: operations.UpResult, flow_run_id: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with operations._prefect_at(console.stack), get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])), limit=200
        )


def _task_states(
    console: operations.UpResult, flow_run_id: str, settled_by: str, count: int
) -> dict[str, list[str]]:
    """Each task's task-run state names (oldest first) in the run, read once `count` task runs of `settled_by`
    have a final state: task-run states reach Prefect's database asynchronously, after the flow run's own."""

    def read() -> dict[str, list[str]] | None:
        runs = sorted(_task_runs(console, flow_run_id), key=lambda t: t.created)
        last = [t for t in runs if t.task_key.rsplit("-", 1)[0] == settled_by]
        if len(last) < count or not all(t.state is not None and t.state.is_final() for t in last):
            return None
        states: dict[str, list[str]] = {}
        for t in runs:
            states.setdefault(t.task_key.rsplit("-", 1)[0], []).append(t.state.name if t.state else "none")
        return states

    found: dict[str, list[str]] = wait_until(read, 60, f"the task runs of {settled_by} to be recorded")
    return found


def _state_of(console: operations.UpResult, flow_run_id: str) -> str:
    state = _flow_run(console, flow_run_id).state
    return f"{state.name}: {state.message}" if state else "no state"


def _worker_log_tail(console: operations.UpResult, lines: int = 40) -> str:
    try:
        return "\n".join(Path(console.worker.log).read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no worker log: {error})"


def _request_of(engine: Engine, flow_run_id: str) -> str:
    with engine.connect() as connection:
        return str(
            connection.execute(
                text("SELECT id FROM privacy_ops.requests WHERE flow_run_id = :f"), {"f": flow_run_id}
            ).scalar_one()
        )


def _s3_versions(settings: Settings, account_id: int) -> int:
    """Object versions and delete markers under the account's prefix, read from moto with the real settings."""
    from privacy_ops.stores import s3 as s3_store

    client = s3_store.client(settings)
    return len(s3_store.list_versions(client, settings.content_bucket, f"accounts/{account_id}/"))


def _sent(request_id: str, kind: str) -> list[EmailMessage]:
    """The messages of one kind the SMTP sink received for a request (by their deterministic Message-ID)."""
    wanted = message_id_for(request_id, kind)
    return [message for message in read_mail() if str(message["Message-ID"]).strip() == wanted]


def _save_storage_endpoint(console: operations.UpResult, settings: Settings, endpoint: str | None) -> None:
    """Save the blocks the worker reads with this S3 endpoint (the rest as `up` saved them)."""
    from blocks.cellcms import save_blocks

    changed = settings.model_copy(update={"s3_endpoint_url": endpoint})
    with operations._prefect_at(console.stack):
        operations._outside_event_loop(lambda: save_blocks(changed, operations.BLOCKS_NAME))


@contextlib.contextmanager
def s3_unreachable(console: operations.UpResult, settings: Settings) -> Iterator[str]:
    """S3 unreachable for the worker's new flow-run processes: the storage block points at a loopback port that is
    bound but never listens (every connection is refused, and nothing else can take the port meanwhile). moto keeps
    running with its data; leaving the block restores the real endpoint."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as dead:
        dead.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{dead.getsockname()[1]}"
        _save_storage_endpoint(console, settings, endpoint)
        try:
            yield endpoint
        finally:
            _save_storage_endpoint(console, settings, settings.s3_endpoint_url)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 1.0) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail naming `what` and the time waited."""
    started = time.monotonic()
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# --- the browser -------------------------------------------------------------------------------------------------


@dataclass
class Console:
    """One test's browser session on the Prefect UI: named steps, numbered screenshots, timings, diagnostics."""

    page: Any
    up: operations.UpResult
    shots: Path
    flow_run_id: str | None = None
    timings: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _shot: int = 0
    _started: float = field(default_factory=time.monotonic)

    @property
    def ui(self) -> str:
        return self.up.ui_url

    def note(self, line: str) -> None:
        """What happened when (seconds since the test started): reloads, reopened menus; kept in timings.txt."""
        self.notes.append(f"{time.monotonic() - self._started:7.1f} s  {line}")
        self._write_timings()

    def _write_timings(self) -> None:
        steps = "".join(f"{s:7.1f} s  {n}\n" for n, s in self.timings)
        notes = "".join(f"{line}\n" for line in self.notes)
        (self.shots / "timings.txt").write_text(f"seconds per step:\n{steps}\nevents:\n{notes}")

    def shot(self, name: str) -> None:
        self._shot += 1
        self.page.screenshot(path=str(self.shots / f"{self._shot:02d}-{name}.png"), full_page=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A named step: timed; on failure a screenshot and an error naming the step, the run's state and the end
        of the worker's log."""
        started = time.monotonic()
        self.note(f"step {name}")
        try:
            yield
        except Exception as error:
            elapsed = time.monotonic() - started
            with contextlib.suppress(Exception):
                self.page.screenshot(path=str(self.shots / f"FAILED-{name}.png"), full_page=True)
            for log in ("worker", "prefect"):  # `down` wipes the stack's home: keep its logs with the shots
                with contextlib.suppress(OSError):
                    shutil.copy(state_dir() / "logs" / f"{log}.log", self.shots / f"{log}.log")
            state = "no run yet"
            if self.flow_run_id:
                with contextlib.suppress(Exception):
                    state = _state_of(self.up, self.flow_run_id)
            raise AssertionError(
                f"UI step {name!r} failed after {elapsed:.0f} s: {error}\n"
                f"page: {self.page.url}\nflow run {self.flow_run_id}: {state}\n"
                f"screenshot: {self.shots / f'FAILED-{name}.png'}\n"
                f"worker log (end):\n{_worker_log_tail(self.up)}"
            ) from error
        finally:
            self.timings.append((name, time.monotonic() - started))
            self.note(f"end of step {name}")

    # Pages and waits.

    def open(self, path: str, ready: Any) -> None:
        """Go to a page and wait until `ready` (a locator) shows; reload once if the first load hangs."""
        for attempt in (1, 2):
            self.page.goto(f"{self.ui}{path}", wait_until="domcontentloaded")
            try:
                ready.first.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
                return
            except Exception:
                if attempt == 2:
                    raise
                self.note(f"{path}: not ready after {UI_TIMEOUT_MS / 1000:.0f} s, loading it again")

    def badge(self, state: str) -> Any:
        """The run page's state badge (the first exact text match: the header renders before the logs)."""
        return self.page.get_by_text(state, exact=True).first

    def open_run(self) -> None:
        self.open(f"/v2/runs/flow-run/{self.flow_run_id}", self.page.get_by_role("button", name="Open menu"))

    def wait_for_state(self, states: set[str], timeout: float, what: str, leaving: str | None = None) -> Any:
        """Wait (Prefect API) until the run's state name is one of `states`; fail early on another final
        state (except `leaving`, the state an action just asked the server to change). Returns the flow run."""
        assert self.flow_run_id is not None
        flow_run_id = self.flow_run_id

        seen: list[str] = []

        def reached() -> Any:
            run = _flow_run(self.up, flow_run_id)
            state = run.state
            if state is not None and (not seen or seen[-1] != state.name):
                seen.append(state.name)
                self.note(f"API: run state {state.name}")
            if state is not None and state.name in states:
                return run
            if state is not None and state.is_final() and state.name != leaving:
                raise AssertionError(f"the run ended {state.name} ({state.message}) while waiting for {what}")
            return None

        found = wait_until(reached, timeout, what)
        self.note(f"API: {what}: {found.state.name}")
        return found

    def show_state(self, state: str) -> None:
        """Reload the run's page until its badge shows `state` (the API already says so)."""
        deadline = time.monotonic() + BADGE_TIMEOUT
        while True:
            self.open_run()
            try:
                self.badge(state).wait_for(state="visible", timeout=10_000)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"the run page did not show {state!r} within {BADGE_TIMEOUT:.0f} s"
                    ) from None
                self.note(f"the run page does not show {state!r} yet: reloading")

    def send(self, button: Any, endpoint: str, what: str) -> Any:
        """Click `button` and return the JSON the Prefect API answered to the POST to `endpoint` that the click
        makes. A 503 (the server's SQLite was busy: the write was rolled back, and the UI only shows an error
        toast) is answered as a person would, by clicking again a few seconds later; any other refusal fails
        with its status and body."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            with self.page.expect_response(
                lambda r: r.request.method == "POST" and r.url.split("?")[0].endswith(endpoint)
            ) as answer:
                button.click()
            response = answer.value
            self.note(f"{what}: POST ...{endpoint} -> {response.status}")
            if response.status == 503 and attempt < SEND_ATTEMPTS:
                time.sleep(3)
                continue
            body = response.json() if response.ok else response.text()
            assert response.ok, f"{what}: the server answered {response.status} ({attempt} tries): {body}"
            return body
        raise AssertionError("unreachable")

    def run_menu(self, item: str) -> None:
        """Open the run's menu and choose `item`; the menu lists only what the state allows, so when it rendered
        before the run's state arrived, close it, reload and try again."""
        for attempt in range(1, 4):
            self.page.get_by_role("button", name="Open menu").first.click()
            entry = self.page.get_by_role("menuitem", name=item, exact=True)
            try:
                entry.wait_for(state="visible", timeout=10_000)
            except Exception:
                if attempt == 3:
                    raise
                self.note(f"the run menu has no {item!r} (attempt {attempt}): reloading")
                self.page.keyboard.press("Escape")
                self.open_run()
                continue
            entry.click()
            return


@pytest.fixture
def ui_page(page: Any) -> Any:
    page.context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/]).*"), lambda route: route.abort())
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.set_default_navigation_timeout(UI_TIMEOUT_MS * 2)
    return page


def _console(page: Any, up: operations.UpResult, name: str) -> Console:
    shots = SHOTS / name
    shots.mkdir(parents=True, exist_ok=True)
    for old in [*shots.glob("*.png"), *shots.glob("*.log"), *SHOTS.glob("*.png"), shots / "timings.txt"]:
        old.unlink(missing_ok=True)
    return Console(page=page, up=up, shots=shots)


def start_erasure_from_the_form(ui: Console, account_id: int) -> str:
    """The deployment's page -> Run -> Custom run -> the intake form -> Submit -> the new run's page.

    The run's id comes from the server's answer to the form (not from the toast, which disappears after 4 s and
    may be gone on a busy machine before it can be clicked): the toast's link is followed when it is still there,
    else the run's page is opened directly."""
    from prefect.client.orchestration import get_client

    with operations._prefect_at(ui.up.stack), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("erasure-request/erasure-request")
    page = ui.page
    with ui.step("open-custom-run-form"):
        ui.open(f"/v2/deployments/deployment/{deployment.id}", page.get_by_role("button", name="Run", exact=True))
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_role("menuitem", name="Custom run").click()
        page.get_by_role("tab", name="SubjectIntake").wait_for()
        ui.shot("custom-run-form")
    with ui.step("fill-intake"):
        page.get_by_role("tab", name="SubjectIntake").click()
        page.get_by_role("tab", name="int", exact=True).click()
        page.get_by_role("tabpanel", name="int").get_by_role("spinbutton").fill(str(account_id))  # no label
        page.get_by_role("textbox", name=re.compile("Requested By")).fill("ui-test")
        ui.shot("intake-filled")
    with ui.step("submit"):
        created = ui.send(page.get_by_role("button", name="Submit"), "/create_flow_run", "the custom run form")
        ui.flow_run_id = str(created["id"])
        try:
            page.get_by_role("link", name="View run").click(timeout=10_000)
            page.wait_for_url(re.compile(rf"/runs/flow-run/{ui.flow_run_id}"))
        except Exception:
            ui.note("the toast's View run link was gone: opening the run's page directly")
        ui.open_run()
        ui.shot("run-started")
    return ui.flow_run_id


def wait_for_the_code(ui: Console, engine: Engine) -> tuple[str, str]:
    """The run suspends for the code (holding no worker); the code comes from the SMTP sink, as the person
    reads it. Returns (request id, code)."""
    assert ui.flow_run_id is not None
    with ui.step("suspended"):
        ui.wait_for_state({"Suspended"}, SUSPEND_TIMEOUT, "the run to suspend for the verification code")
        request_id = _request_of(engine, ui.flow_run_id)
        code = wait_until(lambda: code_from_mail(read_mail(), request_id), 60, "the code email")
        ui.show_state("Suspended")
        ui.shot("suspended")
    return request_id, code


def fill_the_resume_form(ui: Console, code: str) -> Any:
    """Open menu -> Resume -> the "Resume Flow Run" dialog with the code; returns the dialog (not yet sent).
    The dialog builds its form from the run's input schema, fetched when it opens: reopened once if slow."""
    page = ui.page
    with ui.step("resume-form"):
        for attempt in (1, 2):
            ui.run_menu("Resume")
            dialog = page.get_by_role("dialog", name="Resume Flow Run")
            try:
                dialog.get_by_role("textbox", name="Code").wait_for(state="visible")
                break
            except Exception:
                if attempt == 2:
                    raise
                ui.note("the resume form has no Code field yet: reopening it")
                page.keyboard.press("Escape")
                ui.open_run()
        dialog.get_by_role("textbox", name="Code").fill(code)
        ui.shot("resume-form")
    return dialog


def send_the_resume_form(ui: Console, dialog: Any) -> None:
    with ui.step("resume"):
        answer = ui.send(dialog.get_by_role("button", name="Resume"), "/resume", "the resume form")
        assert answer.get("status") == "ACCEPT", f"the server did not resume the run: {answer}"
        dialog.wait_for(state="hidden")
        ui.note("the resume dialog closed")
        ui.wait_for_state(
            {"Resuming", "Scheduled", "Pending", "Submitting", "Running", "Completed", "Failed"},
            60,
            "the run to resume",
        )
        ui.shot("resumed")


def check_artifact(ui: Console, request_id: str) -> None:
    """The run's Artifacts tab lists the console artifact; its page shows the request."""
    page = ui.page
    with ui.step("artifact"):
        page.get_by_role("tab", name="Artifacts").click()
        card = page.get_by_role("link", name=re.compile(r"^MARKDOWN request-"))  # beside a TABLE artifact
        card.wait_for()
        ui.shot("artifacts")
        card.click()
        page.wait_for_url(re.compile(r"/artifacts/artifact/"))
        page.get_by_text(request_id).first.wait_for()
        ui.shot("artifact")


def _audit_outcomes(engine: Engine, request_id: str) -> list[str]:
    with engine.connect() as connection:
        return [f"{e.step}:{e.outcome}" for e in audit.entries_for_request(connection, request_id)]


def _account_rows(engine: Engine, account_id: int) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(text("SELECT count(*) FROM accounts WHERE id = :a"), {"a": account_id}).scalar_one()
        )


# --- the tests ---------------------------------------------------------------------------------------------------


def test_erasure_request_from_the_ui_with_the_code_entered_in_the_resume_form(
    console: operations.UpResult, console_engine: Engine, console_settings: Settings, ui_page: Any
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    ui = _console(ui_page, console, "erasure")
    assert _account_rows(console_engine, ACCOUNT) == 1 and _s3_versions(console_settings, ACCOUNT) > 0

    start_erasure_from_the_form(ui, ACCOUNT)
    request_id, code = wait_for_the_code(ui, console_engine)
    send_the_resume_form(ui, fill_the_resume_form(ui, code))

    with ui.step("completed"):
        final = ui.wait_for_state({"Completed"}, FINISH_TIMEOUT, "the resumed run to complete")
        assert final.name == f"{request_id} erasure"
        ui.show_state("Completed")
        ui.shot("completed")

    # The request, the data and the artifact.
    assert final_status(console_engine, request_id).status == Status.completed
    assert _account_rows(console_engine, ACCOUNT) == 0
    assert _s3_versions(console_settings, ACCOUNT) == 0
    with operations._prefect_at(console.stack), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[final.id]))
        )
    assert any(request_id in str(a.data) for a in artifacts), "the run publishes its console artifact"
    check_artifact(ui, request_id)


def _paying_account(engine: Engine, settings: Settings) -> int:
    """A seeded ordinary account (11..20, not ACCOUNT) with a Stripe customer and S3 files."""
    with engine.connect() as connection:
        candidates = connection.execute(
            text(
                "SELECT account_id FROM billing_profiles WHERE account_id BETWEEN 11 AND 20 AND account_id <> :a "
                "AND stripe_customer_id IS NOT NULL ORDER BY account_id"
            ),
            {"a": ACCOUNT},
        ).scalars()
        for account_id in candidates:
            if _s3_versions(settings, account_id) > 0:
                return int(account_id)
    raise AssertionError("the sandbox has no paying account with S3 files among 11..20")


def test_a_run_failed_on_unreachable_s3_is_retried_from_the_ui_and_resumes_at_the_failed_step(
    console: operations.UpResult, console_engine: Engine, console_settings: Settings, ui_page: Any
) -> None:
    ui = _console(ui_page, console, "retry")
    account_id = _paying_account(console_engine, console_settings)
    with console_engine.connect() as connection:
        customer = connection.execute(
            text("SELECT stripe_customer_id FROM billing_profiles WHERE account_id = :a"), {"a": account_id}
        ).scalar_one()
    assert stripe_store.customer_summary(stripe_store.client(console_settings), customer) is not None

    flow_run_id = start_erasure_from_the_form(ui, account_id)
    request_id, code = wait_for_the_code(ui, console_engine)
    dialog = fill_the_resume_form(ui, code)

    # S3 goes away before the resumed run starts: PostgreSQL is erased, then the S3 step fails (after its retries).
    with s3_unreachable(console, console_settings) as dead:
        send_the_resume_form(ui, dialog)
        with ui.step("failed"):
            failed = ui.wait_for_state({"Failed"}, FINISH_TIMEOUT, f"the run to fail on S3 at {dead}")
            ui.show_state("Failed")
            ui.shot("failed")
    executed = _task_states(console, flow_run_id, settled_by="erase_s3", count=1)
    assert executed["erase_postgres"] == ["Completed"] and executed["erase_s3"] == ["Failed"], executed
    assert "erase_stripe" not in executed, executed
    assert final_status(console_engine, request_id).status == Status.failed
    outcomes = _audit_outcomes(console_engine, request_id)
    assert "act:postgres_erased" in outcomes and "act:s3_erased" not in outcomes, outcomes
    assert outcomes[-1] == "run:failed", outcomes
    assert _account_rows(console_engine, account_id) == 0  # PostgreSQL erasure committed before S3 failed
    assert _s3_versions(console_settings, account_id) > 0  # moto kept its data: nothing was erased there

    # S3 is back (the block restored): Retry in the UI reschedules the SAME run.
    with ui.step("retry-menu"):
        ui.run_menu("Retry")
        confirm = ui.page.get_by_role("alertdialog")
        confirm.get_by_role("button", name="Retry").wait_for()
        ui.shot("retry-confirm")
    with ui.step("retry"):
        answer = ui.send(confirm.get_by_role("button", name="Retry"), "/set_state", "the retry dialog")
        assert answer.get("status") == "ACCEPT", f"the server did not reschedule the run: {answer}"
        confirm.wait_for(state="hidden")
        ui.wait_for_state(
            {"AwaitingRetry", "Scheduled", "Pending", "Submitting", "Running", "Completed"},
            60,
            "the retry",
            leaving="Failed",
        )
        ui.shot("retrying")
    with ui.step("completed-after-retry"):
        final = ui.wait_for_state({"Completed"}, FINISH_TIMEOUT, "the retried run to complete")
        ui.show_state("Completed")
        ui.shot("completed")
    assert str(final.id) == flow_run_id and final.run_count > failed.run_count

    # Finished steps were not executed again: the retry found their persisted results (Cached), only the S3 step
    # and what follows ran.
    executed = _task_states(console, flow_run_id, settled_by="publish_request_artifact", count=1)
    # Ran before the suspension, found done by the resumed run and by the retry.
    assert executed["snapshot_subject"] == ["Completed", "Cached", "Cached"], executed
    assert executed["send_verification_code"] == ["Completed", "Cached", "Cached"], executed
    # Ran once in the resumed run, found done by the retry; S3 failed, then ran; Stripe ran only in the retry.
    assert executed["erase_postgres"] == ["Completed", "Cached"], executed
    assert executed["erase_s3"] == ["Failed", "Completed"], executed
    assert executed["erase_stripe"] == ["Completed"], executed

    # Each email exactly once.
    for kind in ("acknowledgement", "verification_code", "completion"):
        assert len(_sent(request_id, kind)) == 1, kind

    # One coherent audit history: PostgreSQL erased once, the failure, then the rest; the chain verifies.
    outcomes = _audit_outcomes(console_engine, request_id)
    assert outcomes.count("act:postgres_erased") == 1, outcomes
    assert outcomes.count("run:failed") == 1, outcomes
    assert outcomes.count("act:s3_erased") == 1 and outcomes.count("act:stripe_erased") == 1, outcomes
    assert outcomes.count("notify:completion") == 1, outcomes
    failed_at = outcomes.index("run:failed")
    assert outcomes.index("act:postgres_erased") < failed_at < outcomes.index("act:s3_erased"), outcomes
    assert outcomes[-1] == "complete:completed", outcomes
    with console_engine.connect() as connection:
        verdict = audit.verify(connection)
    assert verdict.ok, verdict.problems

    # The request, and the data gone from every store.
    assert final_status(console_engine, request_id).status == Status.completed
    assert _account_rows(console_engine, account_id) == 0
    assert _s3_versions(console_settings, account_id) == 0
    assert stripe_store.customer_summary(stripe_store.client(console_settings), customer) is None
    check_artifact(ui, request_id)
