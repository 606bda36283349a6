"""`privacy-ops up` / `down`: the whole local installation in one command, and gone again in one.

`up` starts the local stack (`privacy_ops.stack`), saves the connections as Prefect blocks, deploys every flow to
the `privacy-ops` process work pool and starts one process worker for that pool as a detached process (its own
session, like the stack's services), then waits until the worker shows up in the pool. Already up: nothing is
started again, the result says so. `down` stops the worker first (a worker whose server is gone ignores SIGTERM),
then the stack, and leaves no process and no listening port behind.

The worker's pid record lives in `state_dir()/worker.json` (not in `run/`, which belongs to the stack and whose
unknown entries `start_stack` stops as strays); its output goes to `state_dir()/logs/worker.log`. Its environment
carries PRIVACY_OPS_HOME and the stack's Prefect settings, so the flow runs it starts find the stack's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from deployments.deploy import WORK_POOL  # cheap: that module imports Prefect only inside its functions
from privacy_ops.settings import HOME_VARIABLE, PROJECT_ROOT, load_settings, state_dir
from privacy_ops.stack import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    StackError,
    StackInfo,
    prefect_env,
    read_stack,
    settings_env,
    start_stack,
    stop_stack,
)

BLOCKS_NAME = "cellcms"
WORKER_START_TIMEOUT = 90.0  # until the worker is seen polling the pool (imports Prefect, ~5-15 s on 2 busy cores)

Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass(frozen=True)
class WorkerInfo:
    """The detached process worker started by `up`."""

    pid: int
    create_time: float
    pool: str
    log: str

    def alive(self) -> bool:
        """True while the recorded process runs (and is not a later process that reused its pid)."""
        try:
            process = psutil.Process(self.pid)
            return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - self.create_time) < 1.0
        except psutil.Error:
            return False


@dataclass(frozen=True)
class UpResult:
    """What `up` found or did."""

    stack: StackInfo
    worker: WorkerInfo
    ui_url: str
    already_up: bool
    started_services: list[str] = field(default_factory=list)
    worker_started: bool = False
    deployments: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DownResult:
    """What `down` stopped."""

    worker_stopped: bool
    services: list[str]


# --- paths -------------------------------------------------------------------------------------------------------


def worker_record() -> Path:
    return state_dir() / "worker.json"


def worker_log() -> Path:
    return state_dir() / "logs" / "worker.log"


def read_worker() -> WorkerInfo | None:
    """The recorded worker (alive or not), or None."""
    try:
        data = json.loads(worker_record().read_text())
        return WorkerInfo(
            pid=int(data["pid"]),
            create_time=float(data["create_time"]),
            pool=str(data["pool"]),
            log=str(data["log"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ui_url(info: StackInfo) -> str:
    """The Prefect UI's address: the stack's own server, or the external API URL without its `/api`."""
    prefect = info.services.get("prefect")
    if prefect is not None and not prefect.external:
        return prefect.url
    api = info.prefect_api_url or ""
    return api[: -len("/api")] if api.endswith("/api") else api


# --- Prefect client calls ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _prefect_at(info: StackInfo) -> Iterator[None]:
    """Point this process's Prefect client at the stack's server, whatever it was pointed at before."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_env(info)["PREFECT_API_URL"]}):
        yield


def pool_workers(info: StackInfo, pool: str = WORK_POOL) -> list[Any]:
    """The workers the Prefect server currently sees polling `pool` (status ONLINE)."""
    from prefect.client.orchestration import get_client

    with _prefect_at(info), get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return [worker for worker in workers if str(getattr(worker.status, "value", worker.status)) == "ONLINE"]


def _save_blocks_and_deploy(
    info: StackInfo, environ: Mapping[str, str], blocks_name: str, pool: str
) -> tuple[list[str], list[str]]:
    from blocks.cellcms import save_blocks
    from deployments.deploy import deploy_all

    # The stack's published settings, with the caller's environment winning (as for every other command).
    settings = load_settings(dict(settings_env(info)) | dict(environ))

    def run() -> tuple[list[str], list[str]]:
        # flow.deploy prints a table of what it applied: the caller reports the deployments itself.
        with _prefect_at(info), contextlib.redirect_stdout(io.StringIO()):
            return save_blocks(settings, blocks_name), deploy_all(pool)

    return _outside_event_loop(run)


def _outside_event_loop(function: Callable[[], T]) -> T:
    """Call `function` here, or in a thread when this thread runs an event loop (Jupyter, Playwright's sync API):
    Prefect's sync-or-async methods (Block.save, Flow.from_source) would otherwise hand back coroutines."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return function()
    context = contextvars.copy_context()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(context.run, function).result()


# --- the worker --------------------------------------------------------------------------------------------------


def worker_environment(
    info: StackInfo, environ: Mapping[str, str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment: the caller's, the stack's Prefect settings and PRIVACY_OPS_HOME (flow runs it
    starts inherit it and so find the stack's settings), then `extra` (e.g. PREFECT_WORKER_QUERY_SECONDS)."""
    env = dict(environ)
    env.update(prefect_env(info))
    env[HOME_VARIABLE] = str(state_dir())
    env.setdefault("PREFECT_CLI_PROMPT", "false")
    env.update(extra or {})
    return env


def start_worker(
    info: StackInfo,
    *,
    pool: str = WORK_POOL,
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = WORKER_START_TIMEOUT,
) -> WorkerInfo:
    """Start one detached process worker for `pool`, record it, and wait until the server sees it polling."""
    log = worker_log()
    log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = worker_environment(info, os.environ if environ is None else environ, extra_env)
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    with open(log, "ab") as out:
        out.write(f"\n=== privacy-ops up: starting a worker for {pool} at {time.ctime()} ===\n".encode())
        out.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives `up`; stopped as one process group by `down`
            env=env,
            cwd=PROJECT_ROOT,  # deployments load their flows from the project directory
        )
    try:
        create_time = psutil.Process(process.pid).create_time()
    except psutil.Error:
        create_time = time.time()
    worker = WorkerInfo(pid=process.pid, create_time=create_time, pool=pool, log=str(log))
    tmp = worker_record().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(worker)))
    os.replace(tmp, worker_record())

    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            worker_record().unlink(missing_ok=True)
            raise StackError(f"the worker exited with code {code} while starting: see {log}")
        with contextlib.suppress(Exception):  # the server may answer slowly while the worker registers
            if pool_workers(info, pool):
                return worker
        if time.monotonic() > deadline:
            stop_worker()
            raise StackError(f"the worker did not start polling {pool} in time: see {log}")
        time.sleep(0.5)


def _tree(pid: int) -> list[psutil.Process]:
    """The worker's process group plus every descendant (flow runs it started may sit in other groups)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        found[root.pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    for process in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(process.pid) == pid:
                found[process.pid] = process
    return [p for p in found.values() if _running(p)]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_worker(timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the recorded worker and everything it started: SIGTERM, SIGKILL after `timeout`. True if one ran."""
    worker = read_worker()
    if worker is None or not worker.alive():
        worker_record().unlink(missing_ok=True)
        return False
    processes = _tree(worker.pid)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    # Reap our own child (a long-lived caller, e.g. a test session, would otherwise keep a zombie).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(worker.pid, os.WNOHANG)
    if [p for p in alive if _running(p)]:
        raise StackError(f"could not stop the worker (pid {worker.pid})")
    worker_record().unlink(missing_ok=True)
    return True


# --- up / down ---------------------------------------------------------------------------------------------------


def up(
    *,
    environ: Mapping[str, str] | None = None,
    pool: str = WORK_POOL,
    blocks_name: str = BLOCKS_NAME,
    worker_env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    progress: Progress | None = None,
) -> UpResult:
    """Start the stack, save the blocks, deploy every flow and start one worker; idempotent.

    `environ` (default os.environ) decides which services are external and is the worker's base environment;
    `worker_env` is added to the worker's environment only.
    """
    say = progress or (lambda _line: None)
    env = os.environ if environ is None else environ
    info = start_stack(environ=env, timeout=timeout, progress=say)
    if not info.prefect_api_url:
        raise StackError("no Prefect server in the local stack: cannot deploy")
    worker = read_worker()
    worker_running = worker is not None and worker.alive()
    if worker_running and "prefect" in info.started:
        say("the Prefect server was restarted: restarting the worker ...")
        stop_worker()
        worker_running = False
    if not info.started and worker_running and worker is not None:
        return UpResult(stack=info, worker=worker, ui_url=ui_url(info), already_up=True)

    say("saving blocks and deploying ...")
    blocks, deployments = _save_blocks_and_deploy(info, env, blocks_name, pool)
    started_worker = False
    if not worker_running or worker is None:
        say(f"starting a worker for the {pool} pool ...")
        worker = start_worker(info, pool=pool, environ=env, extra_env=worker_env)
        started_worker = True
    return UpResult(
        stack=info,
        worker=worker,
        ui_url=ui_url(info),
        already_up=False,
        started_services=list(info.started),
        worker_started=started_worker,
        deployments=deployments,
        blocks=blocks,
    )


def down(*, wipe: bool = False, timeout: float = STOP_TIMEOUT, progress: Progress | None = None) -> DownResult:
    """Stop the worker first (it ignores SIGTERM once its server is gone), then the stack."""
    say = progress or (lambda _line: None)
    if read_worker() is not None:
        say("stopping the worker ...")
    worker_stopped = stop_worker(timeout)
    services = stop_stack(wipe=wipe, timeout=timeout, progress=say)
    if wipe:
        worker_record().unlink(missing_ok=True)
    return DownResult(worker_stopped=worker_stopped, services=services)


def is_up() -> bool:
    """True when a stack is recorded and the worker runs."""
    worker = read_worker()
    return read_stack() is not None and worker is not None and worker.alive()
