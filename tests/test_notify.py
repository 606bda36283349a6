"""Notification emails against a real PostgreSQL and real aiosmtpd servers: exactly once, both parts, no leaks."""

from __future__ import annotations

import datetime as dt
import ipaddress
import mailbox
import shutil
import socket
import ssl
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from privacy_ops.lifecycle import notify
from privacy_ops.lifecycle.notify import NotificationError, SmtpSettings, send_once, send_operator_mail
from privacy_ops.lifecycle.schema import ensure_schema
from privacy_ops.pii import Pii
from privacy_ops.settings import Settings

ADDRESS = "dana.subject@example.org"
NOW = dt.datetime(2026, 11, 29, 15, 4, tzinfo=dt.UTC)
CONTEXTS: dict[str, dict[str, Any]] = {
    "acknowledgement": {"right": "erasure", "due_at": NOW + dt.timedelta(days=30)},
    "verification_code": {"right": "access", "code": "482913", "expires_at": NOW + dt.timedelta(hours=24)},
    "completion": {
        "right": "access",
        "summary": [
            {"store": "CellCMS account and projects", "action": "exported", "count": 12},
            {"store": "Billing (Stripe)", "action": "exported", "count": 1},
        ],
        "export_url": "https://exports.example.test/req/package.zip?X-Amz-Signature=abc&X-Amz-Expires=604800",
        "export_expires_at": dt.date(2026, 12, 6),
    },
    "denial": {"right": "erasure", "reason": "We could not confirm that the request comes from you."},
    "no_data_held": {"right": "erasure"},
}

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: the session stack (conftest): its PostgreSQL, with a fresh database for this module, and its aiosmtpd
# sink (`python -m aiosmtpd ... Mailbox`), read back from its Maildir. Extra aiosmtpd servers in-process play a
# refusing server and TLS servers.
# ---------------------------------------------------------------------------------------------------------------

ReadMail = Callable[[], list[EmailMessage]]


@pytest.fixture(scope="module")
def db(engine: Engine) -> Iterator[Engine]:
    admin = engine.execution_options(isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a transaction
    name = f"test_notify_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    fresh = create_engine(engine.url.set(database=name))
    with fresh.begin() as connection:
        ensure_schema(connection)
    yield fresh
    fresh.dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def smtp(settings: Settings, maildir: Path, db: Engine) -> SmtpSettings:
    """The stack's SMTP sink, emptied, and no notification claimed yet."""
    mailbox.Maildir(maildir, create=False).clear()
    with db.begin() as connection:
        connection.execute(text("TRUNCATE privacy_ops.notifications"))
    return SmtpSettings.from_settings(settings, timeout=10)


def _row(engine: Engine, request_id: str, kind: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT status, message_id, sent_at FROM privacy_ops.notifications "
                "WHERE request_id = :r AND kind = :k"
            ),
            {"r": request_id, "k": kind},
        ).one_or_none()


def _body(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    assert part is not None and part.get_content_type() == f"text/{subtype}"
    return str(part.get_content())


# ---------------------------------------------------------------------------------------------------------------
# Exactly once
# ---------------------------------------------------------------------------------------------------------------


def test_send_once_twice_delivers_one_message(db: Engine, smtp: SmtpSettings, read_mail: ReadMail) -> None:
    arguments: dict[str, Any] = {
        "request_id": "req_7f3a9c21b0",
        "kind": "acknowledgement",
        "to": Pii(ADDRESS),
        "context": CONTEXTS["acknowledgement"],
    }
    assert send_once(db, smtp, **arguments) is True
    assert send_once(db, smtp, **arguments) is False

    (message,) = read_mail()
    assert message["Message-ID"] == "<req_7f3a9c21b0.acknowledgement@privacy-ops.cellcms>"
    assert message["To"] == ADDRESS
    assert message["From"] == "privacy@cellcms.com"
    assert message["Subject"] == "We received your privacy request req_7f3a9c21b0"
    assert message.get_content_type() == "multipart/alternative"
    plain, html = _body(message, "plain"), _body(message, "html")
    for body in (plain, html):
        assert "req_7f3a9c21b0" in body
        assert "30 days" in body
        assert "privacy@cellcms.com" in body
        assert "29 December 2026" in body  # the due date
        assert ADDRESS not in body  # the email needs no address in it
    assert html.lstrip().startswith("<!DOCTYPE html>")

    row = _row(db, "req_7f3a9c21b0", "acknowledgement")
    assert (row.status, row.message_id) == ("sent", "<req_7f3a9c21b0.acknowledgement@privacy-ops.cellcms>")
    assert row.sent_at is not None


def test_each_kind_once_per_request(db: Engine, smtp: SmtpSettings, read_mail: ReadMail) -> None:
    for kind, context in CONTEXTS.items():
        assert send_once(db, smtp, request_id="req_allkinds", kind=kind, to=Pii(ADDRESS), context=context)
    assert send_once(db, smtp, request_id="req_other", kind="denial", to=Pii(ADDRESS), context=CONTEXTS["denial"])
    ids = sorted(message["Message-ID"] for message in read_mail())
    assert ids == sorted(
        [f"<req_allkinds.{kind}@privacy-ops.cellcms>" for kind in CONTEXTS]
        + ["<req_other.denial@privacy-ops.cellcms>"]
    )


def test_sending_row_left_by_a_crashed_run_is_sent(db: Engine, smtp: SmtpSettings, read_mail: ReadMail) -> None:
    # A run that claimed the row and died before the SMTP server accepted anything.
    with db.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO privacy_ops.notifications (request_id, kind, status, message_id) "
                "VALUES ('req_crashed', 'completion', 'sending', '<req_crashed.completion@privacy-ops.cellcms>')"
            )
        )
    assert (
        send_once(
            db, smtp, request_id="req_crashed", kind="completion", to=Pii(ADDRESS), context=CONTEXTS["completion"]
        )
        is True
    )
    (message,) = read_mail()
    assert message["Message-ID"] == "<req_crashed.completion@privacy-ops.cellcms>"
    assert _row(db, "req_crashed", "completion").status == "sent"


def test_crash_after_acceptance_resends_with_the_same_message_id(
    db: Engine, smtp: SmtpSettings, read_mail: ReadMail
) -> None:
    # The documented window: SMTP accepted, then the 'sent' commit was lost. A rerun sends one copy more, with the
    # same Message-ID, so the receiving side can drop it.
    arguments: dict[str, Any] = {
        "request_id": "req_window",
        "kind": "denial",
        "to": Pii(ADDRESS),
        "context": CONTEXTS["denial"],
    }
    assert send_once(db, smtp, **arguments)
    with db.begin() as connection:
        connection.execute(text("UPDATE privacy_ops.notifications SET status = 'sending', sent_at = NULL"))
    assert send_once(db, smtp, **arguments)
    assert send_once(db, smtp, **arguments) is False
    ids = [message["Message-ID"] for message in read_mail()]
    assert ids == ["<req_window.denial@privacy-ops.cellcms>"] * 2


def test_racing_workers_send_once(db: Engine, smtp: SmtpSettings, read_mail: ReadMail) -> None:
    workers = 4
    start = threading.Barrier(workers)
    results: list[bool] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            results.append(
                send_once(
                    db,
                    smtp,
                    request_id="req_race",
                    kind="verification_code",
                    to=Pii(ADDRESS),
                    context=CONTEXTS["verification_code"],
                )
            )
        except BaseException as error:  # surfaced below: an assertion in a thread would be lost
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results) == [False] * (workers - 1) + [True]
    assert len(read_mail()) == 1


def test_bad_context_claims_nothing(db: Engine, smtp: SmtpSettings, read_mail: ReadMail) -> None:
    with pytest.raises(ValueError, match="takes no email"):
        send_once(
            db,
            smtp,
            request_id="req_bad",
            kind="no_data_held",
            to=Pii(ADDRESS),
            context={"right": "erasure", "email": ADDRESS},
        )
    with pytest.raises(TypeError, match="must be a Pii"):
        plain: Any = ADDRESS  # a plain str, as a careless caller might pass
        send_once(db, smtp, request_id="req_bad", kind="no_data_held", to=plain, context=CONTEXTS["no_data_held"])
    assert _row(db, "req_bad", "no_data_held") is None
    assert read_mail() == []


def test_settings_model_accepted(db: Engine, smtp: SmtpSettings, settings: Settings, read_mail: ReadMail) -> None:
    settings = settings.model_copy(update={"mail_from": "privacy-noreply@cellcms.com"})
    assert send_once(
        db,
        settings,
        request_id="req_settings",
        kind="no_data_held",
        to=Pii(ADDRESS),
        context=CONTEXTS["no_data_held"],
    )
    (message,) = read_mail()
    assert message["From"] == "privacy-noreply@cellcms.com"
    assert message["Reply-To"] == "privacy@cellcms.com"


# ---------------------------------------------------------------------------------------------------------------
# Failures never name the recipient
# ---------------------------------------------------------------------------------------------------------------


def _assert_no_address(error: BaseException) -> None:
    rendered = "".join(traceback.format_exception(error))
    for text_form in (str(error), repr(error), rendered):
        assert ADDRESS not in text_form
        assert "dana.subject" not in text_form


def test_smtp_down_raises_without_the_address(db: Engine, smtp: SmtpSettings, read_mail: ReadMail) -> None:
    down = SmtpSettings(host="127.0.0.1", port=_free_port(), security="none", timeout=5)
    with pytest.raises(NotificationError) as raised:
        send_once(
            db, down, request_id="req_down", kind="completion", to=Pii(ADDRESS), context=CONTEXTS["completion"]
        )
    error = raised.value
    assert "completion email for request req_down not sent" in str(error)
    assert "ConnectionRefusedError" in str(error)
    assert (error.request_id, error.kind) == ("req_down", "completion")
    _assert_no_address(error)
    assert error.__cause__ is None and error.__context__ is None
    # The claim stays 'sending': once the server is back, the next run sends it.
    assert _row(db, "req_down", "completion").status == "sending"
    assert send_once(
        db, smtp, request_id="req_down", kind="completion", to=Pii(ADDRESS), context=CONTEXTS["completion"]
    )
    assert len(read_mail()) == 1


class _Refuser:
    """Refuses every recipient, quoting the address back like real servers do."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"


def test_refused_recipient_reports_the_code_not_the_address(db: Engine, smtp: SmtpSettings) -> None:
    port = _free_port()
    controller = Controller(_Refuser(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        refusing = SmtpSettings(host="127.0.0.1", port=port, security="none", timeout=5)
        with pytest.raises(NotificationError) as raised:
            send_once(
                db, refusing, request_id="req_refused", kind="denial", to=Pii(ADDRESS), context=CONTEXTS["denial"]
            )
    finally:
        controller.stop()
    error = raised.value
    assert error.smtp_code == 550
    assert str(error) == "denial email for request req_refused not sent: recipient refused, SMTP 550"
    _assert_no_address(error)


# ---------------------------------------------------------------------------------------------------------------
# STARTTLS, implicit TLS and login, against aiosmtpd with a throwaway certificate the client is told to trust
# ---------------------------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (b"ops", b"s3cret")
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535 itself on failure


@pytest.fixture(scope="module")
def tls_files() -> Iterator[tuple[Path, Path]]:
    folder = Path(tempfile.mkdtemp(prefix="privacy-ops-test-tls-"))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    yield cert_path, key_path
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("security", ["starttls", "ssl"])
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # implicit TLS: it is encrypted
def test_tls_and_login(
    db: Engine, smtp: SmtpSettings, tls_files: tuple[Path, Path], security: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert_path, key_path = tls_files
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_path))  # ssl.create_default_context() trusts it from here
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_path, key_path)
    recorder, port = _Recorder(), _free_port()
    # aiosmtpd only counts STARTTLS as encryption for AUTH; with implicit TLS the whole connection is encrypted.
    tls: dict[str, Any] = (
        {"tls_context": server_context, "require_starttls": True}
        if security == "starttls"
        else {"ssl_context": server_context, "auth_require_tls": False}
    )
    controller = Controller(
        recorder, hostname="127.0.0.1", port=port, authenticator=_authenticator, auth_required=True, **tls
    )
    controller.start()
    try:
        good = SmtpSettings(
            host="127.0.0.1",
            port=port,
            security=security,  # type: ignore[arg-type]
            username="ops",
            password=SecretStr("s3cret"),
            timeout=5,
        )
        assert send_once(
            db,
            good,
            request_id=f"req_tls_{security}",
            kind="no_data_held",
            to=Pii(ADDRESS),
            context=CONTEXTS["no_data_held"],
        )
        bad = SmtpSettings(
            host="127.0.0.1",
            port=port,
            security=security,  # type: ignore[arg-type]
            username="ops",
            password=SecretStr("wrong"),
            timeout=5,
        )
        with pytest.raises(NotificationError) as raised:
            send_once(
                db,
                bad,
                request_id=f"req_tls_bad_{security}",
                kind="no_data_held",
                to=Pii(ADDRESS),
                context=CONTEXTS["no_data_held"],
            )
    finally:
        controller.stop()
    assert [envelope.rcpt_tos for envelope in recorder.envelopes] == [[ADDRESS]]
    assert raised.value.smtp_code == 535
    _assert_no_address(raised.value)


# ---------------------------------------------------------------------------------------------------------------
# Rendering and operator mail
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CONTEXTS))
def test_every_kind_speaks_plainly_and_cites_the_policy(kind: str) -> None:
    rendered = notify.render(kind, "req_kinds01", CONTEXTS[kind])
    assert "req_kinds01" in rendered.subject
    for body in (rendered.text, rendered.html):
        assert "req_kinds01" in body
        assert "within 30 days" in body
        assert "privacy@cellcms.com" in body
        assert "{{" not in body and "None" not in body


def test_kind_specific_content() -> None:
    code = notify.render("verification_code", "req_1", CONTEXTS["verification_code"])
    assert "482913" in code.text and "482913" in code.html
    assert "482913" not in code.subject  # subjects show on lock screens
    assert "30 November 2026, 15:04 UTC" in code.text

    done = notify.render("completion", "req_1", CONTEXTS["completion"])
    assert "- CellCMS account and projects: exported (12 items)" in done.text
    assert "- Billing (Stripe): exported (1 item)" in done.text
    assert CONTEXTS["completion"]["export_url"] in done.text
    assert "&amp;X-Amz-Expires" in done.html  # autoescaped in the href
    assert "6 December 2026" in done.text

    no_export = notify.render(
        "completion",
        "req_1",
        {
            "right": "erasure",
            "summary": [
                {
                    "store": "Billing (Stripe)",
                    "action": "invoices kept",
                    "count": 2,
                    "note": "Tax law requires us to keep them until 31 December 2033",
                }
            ],
        },
    )
    assert "Download" not in no_export.text and "Download" not in no_export.html
    assert "Tax law requires us to keep them until 31 December 2033" in no_export.text

    denial = notify.render("denial", "req_1", {"right": "erasure", "reason": "<b>identity</b> not confirmed"})
    assert "&lt;b&gt;identity&lt;/b&gt;" in denial.html
    assert "<b>identity</b> not confirmed" in denial.text  # plain text is not escaped
    assert "supervisory authority" in denial.text
    expired = notify.render(
        "denial", "req_1", {"right": "access", "reason": "the code expired before it was entered"}
    )
    assert "Reason: The code expired before it was entered.\n" in expired.text  # fragments become sentences


@pytest.mark.parametrize(
    ("kind", "request_id", "context", "message"),
    [
        ("apology", "req_1", {}, "unknown email kind"),
        ("acknowledgement", "req_1", {"right": "erasure"}, "needs due_at"),
        ("acknowledgement", "req_1", {"right": "erasure", "due_at": NOW, "name": "Dana"}, "takes no name"),
        ("no_data_held", "req_1", {"right": "telepathy"}, "no wording for right"),
        ("completion", "req_1", {"right": "access", "summary": [], "export_url": "https://x"}, "go together"),
        (
            "completion",
            "req_1",
            {"right": "access", "summary": [], "export_url": "javascript:alert(1)", "export_expires_at": NOW},
            "http",
        ),
        ("completion", "req_1", {"right": "access", "summary": [{"store": "x"}]}, r"summary\[0\] needs"),
        ("acknowledgement", "req <1>", {"right": "erasure", "due_at": NOW}, "request_id must be"),
    ],
)
def test_bad_input_rejected(kind: str, request_id: str, context: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        notify.render(kind, request_id, context)


def test_operator_mail(smtp: SmtpSettings, read_mail: ReadMail) -> None:
    send_operator_mail(smtp, "compliance@cellcms.com", "Privacy ops: daily summary", "3 requests completed.\n")
    (message,) = read_mail()
    assert message["To"] == "compliance@cellcms.com"
    assert message["Subject"] == "Privacy ops: daily summary"
    assert message.get_content_type() == "text/plain"
    assert message.get_content() == "3 requests completed.\n"
    assert message["Message-ID"].endswith("@privacy-ops.cellcms>")


def test_operator_mail_failure_does_not_name_the_mailbox() -> None:
    down = SmtpSettings(host="127.0.0.1", port=_free_port(), security="none", timeout=5)
    with pytest.raises(NotificationError, match="operator mail not sent") as raised:
        send_operator_mail(down, "compliance@cellcms.com", "summary", "text")
    assert "compliance@" not in str(raised.value)
