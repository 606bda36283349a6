"""Driving request flows from the command line: start one, feed it the verification code, wait for the outcome.

A flow waiting for its code is paused (local run) or suspended (deployed run) in Prefect; `submit_code` resumes it
through the Prefect API with the code as run input, exactly as the UI's resume form does.
"""

from __future__ import annotations

import contextvars
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, select

from privacy_ops.lifecycle import requests as request_records
from privacy_ops.lifecycle import verification
from privacy_ops.lifecycle.schema import requests as requests_table

PLACEHOLDER_CODE = "000000"  # resumes a run an operator verified by other means; never checked against a hash


class RunnerError(Exception):
    """A request could not be driven (not waiting, unknown id, timeout): one line, no personal data."""


@dataclass
class FlowThread:
    """A flow run executing in a background thread of this process (so it can pause while we resume it)."""

    thread: threading.Thread
    started_at: datetime
    result: list[Any] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)

    def wait(self, timeout: float) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RunnerError(f"the flow did not finish within {timeout:.0f} s")
        if self.error:
            raise self.error[0]
        return self.result[0] if self.result else None


def start_flow(flow_fn: Callable[..., Any], **parameters: Any) -> FlowThread:
    """Run a flow in a daemon thread; its pause (waiting for the code) blocks only that thread."""
    holder = FlowThread(thread=threading.Thread(), started_at=datetime.now(UTC))

    def run() -> None:
        try:
            holder.result.append(flow_fn(**parameters))
        except BaseException as error:  # handed to the caller of wait()
            holder.error.append(error)

    # Prefect's settings (e.g. a temporary API URL) live in context variables, which a new thread does not inherit.
    context = contextvars.copy_context()
    holder.thread = threading.Thread(
        target=context.run, args=(run,), name=f"flow-{getattr(flow_fn, 'name', 'run')}", daemon=True
    )
    holder.thread.start()
    return holder


def find_new_request(engine: Engine, right: str, since: datetime, timeout: float = 120) -> str:
    """The id of the request a just-started flow created (the newest of that right since `since`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            found = connection.execute(
                select(requests_table.c.id)
                .where(requests_table.c.right == right, requests_table.c.received_at >= since)
                .order_by(requests_table.c.received_at.desc())
                .limit(1)
            ).scalar_one_or_none()
        if found:
            return str(found)
        time.sleep(0.5)
    raise RunnerError(f"no {right} request appeared within {timeout:.0f} s")


def wait_until_awaiting_code(engine: Engine, request_id: str, timeout: float = 120) -> None:
    """Block until the request's flow run is paused or suspended waiting for its code."""
    from prefect import get_client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            request = request_records.get_request(connection, request_id)
        if request.status in request_records.FINAL:
            raise RunnerError(f"request {request_id} is already {request.status.value}")
        if request.flow_run_id is not None:
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(request.flow_run_id)).state
            if state is not None and state.is_paused():
                return
        time.sleep(0.5)
    raise RunnerError(f"request {request_id} is not waiting for a verification code")


def submit_code(
    engine: Engine, request_id: str, code: str, timeout: float = 120, *, verification_id: str | None = None
) -> verification.Verification:
    """Resume the waiting flow run with the code, then report the verification state it reached. The code is for
    the request's identity check unless `verification_id` names another (a rectification's new address)."""
    from prefect.flow_runs import resume_flow_run

    key = verification_id or request_id
    with engine.connect() as connection:
        request = request_records.get_request(connection, request_id)
        before = verification.get_verification(connection, key)
    if request.flow_run_id is None or before is None:
        raise RunnerError(f"request {request_id} is not waiting for a verification code")
    wait_until_awaiting_code(engine, request_id, timeout)
    resume_flow_run(UUID(request.flow_run_id), run_input={"code": code})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            after = verification.get_verification(connection, key)
        if after is not None and (after.attempts != before.attempts or after.status != before.status):
            return after
        time.sleep(0.5)
    raise RunnerError(f"request {request_id}: the flow did not check the code within {timeout:.0f} s")


def continue_after_operator_verification(engine: Engine, request_id: str, timeout: float = 60) -> str:
    """After an operator recorded a verification: resume the run if it waits for a code, else let it be (it reads
    the verification before it would wait). Returns what happened, for the operator."""
    from prefect import get_client
    from prefect.flow_runs import resume_flow_run

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = final_status(engine, request_id)
        if request.status in request_records.FINAL or request.flow_run_id is None:
            return f"request {request_id} is {request.status.value}"
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(request.flow_run_id)).state
        if state is not None and state.is_paused():
            resume_flow_run(UUID(request.flow_run_id), run_input={"code": PLACEHOLDER_CODE})
            return f"request {request_id} resumed"
        if state is not None and state.is_final():
            return f"request {request_id}: its flow run is {state.type.value.lower()}"
        time.sleep(0.5)
    return f"request {request_id}: verification recorded; its run continues on its own"


def final_status(engine: Engine, request_id: str) -> request_records.Request:
    with engine.connect() as connection:
        return request_records.get_request(connection, request_id)


def code_from_mail(messages: list[EmailMessage], request_id: str) -> str | None:
    """The verification code in the newest code email of a request (the demo and tests read the SMTP sink)."""
    for message in reversed(messages):
        if request_id in str(message["Subject"]) and "confirmation code" in str(message["Subject"]):
            part = message.get_body(preferencelist=("plain",))
            found = re.search(r"\b(\d{6})\b", part.get_content() if part is not None else "")
            if found:
                return found.group(1)
    return None
