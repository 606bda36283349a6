"""Emails to the person behind a privacy request, each kind sent exactly once per request; and operator mail.

Every email has a plain-text and an HTML part, rendered from `privacy_ops/templates/<kind>.txt|.html` (HTML is
autoescaped). Each kind accepts exactly the context it needs and nothing else, so a caller cannot slip extra
personal data into an email by accident.

Exactly once: `send_once` claims a row in `privacy_ops.notifications` (unique per request and kind) in its own
committed transaction, then sends while holding that row's lock and marks it 'sent' in the same transaction. A
second caller (rerun or racing worker) waits on the lock and then sees 'sent'. The recipient address arrives as
`Pii` and is revealed only in `_deliver`, at the SMTP call; errors name the request, kind and SMTP code, never it.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Literal, cast

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import Engine

from privacy_ops.lifecycle.schema import SCHEMA
from privacy_ops.pii import Pii
from privacy_ops.settings import Settings

CONTACT_EMAIL = "privacy@cellcms.com"  # the privacy policy's contact for every question about a request
ANSWER_DAYS = 30  # the privacy policy's promise: every request answered within 30 days
MESSAGE_ID_DOMAIN = "privacy-ops.cellcms"
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

Security = Literal["none", "starttls", "ssl"]
_SECURITY: tuple[str, ...] = ("none", "starttls", "ssl")
# Request ids go into Message-IDs and subjects: only the characters our ids use.
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class NotificationError(Exception):
    """An email could not be sent. The message names request, kind and SMTP code, never the recipient."""

    def __init__(
        self, message: str, *, request_id: str | None = None, kind: str | None = None, smtp_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.kind = kind
        self.smtp_code = smtp_code


@dataclass(frozen=True)
class SmtpSettings:
    """How to reach the SMTP server; `from_settings` builds it from the project's Settings."""

    host: str
    port: int
    security: Security = "starttls"
    username: str | None = None
    password: SecretStr | None = field(default=None, repr=False)
    mail_from: str = "privacy@cellcms.com"
    timeout: float = 30.0  # seconds per socket operation: a hung server must not hang a flow forever

    def __post_init__(self) -> None:
        if self.security not in _SECURITY:
            raise ValueError(f"SMTP security must be one of {', '.join(_SECURITY)}")

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float = 30.0) -> SmtpSettings:
        return cls(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=cast(Security, settings.smtp_security),  # checked in __post_init__
            username=settings.smtp_username or None,
            password=settings.smtp_password,
            mail_from=settings.mail_from,
            timeout=timeout,
        )


def _smtp(settings: SmtpSettings | Settings) -> SmtpSettings:
    return settings if isinstance(settings, SmtpSettings) else SmtpSettings.from_settings(settings)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------

# How each right reads in a sentence ("your request for ..."). An unknown right fails loudly before any mail goes.
RIGHT_LABELS: dict[str, str] = {
    "access": "a copy of your personal data",
    "portability": "a copy of your personal data in a portable format",
    "erasure": "the deletion of your personal data",
    "rectification": "the correction of your personal data",
    "restriction": "restricting how we use your personal data",
    "objection": "stopping the use of your personal data",
    "opt_out": "opting out of the sale or sharing of your personal data",
    "know": "the categories and specific pieces of personal information we collected about you",
}


@dataclass(frozen=True)
class _Kind:
    subject: str  # str.format with request_id
    required: frozenset[str]
    optional: frozenset[str] = frozenset()


KINDS: dict[str, _Kind] = {
    "acknowledgement": _Kind("We received your privacy request {request_id}", frozenset({"right", "due_at"})),
    # The code stays out of the subject: subjects show on lock screens and in mail server logs.
    "verification_code": _Kind(
        "Your confirmation code for privacy request {request_id}", frozenset({"right", "code", "expires_at"})
    ),
    "completion": _Kind(
        "Your privacy request {request_id} is complete",
        frozenset({"right", "summary"}),
        frozenset({"export_url", "export_expires_at"}),
    ),
    "denial": _Kind("We could not carry out your privacy request {request_id}", frozenset({"right", "reason"})),
    "no_data_held": _Kind("Your privacy request {request_id}: we hold no data about you", frozenset({"right"})),
    "duplicate": _Kind(
        "Your privacy request {request_id} is already being handled", frozenset({"right", "open_request_id"})
    ),
    # Told before the restriction is lifted (GDPR art. 18(3)).
    "restriction_lifting": _Kind(
        "We are lifting the restriction of your personal data ({request_id})", frozenset({"right", "reason"})
    ),
    # Rectification: a code to a new email address confirms it is the person's (no code in the subject) ...
    "new_email_code": _Kind(
        "Confirm your new email address for privacy request {request_id}",
        frozenset({"right", "code", "expires_at"}),
    ),
    # ... and the old address is told it was replaced (without the new one: the old mailbox may be someone else's).
    "email_changed": _Kind(
        "The email address of your CellCMS account was changed (privacy request {request_id})",
        frozenset({"right"}),
    ),
}


@dataclass(frozen=True)
class RenderedEmail:
    """Subject and both bodies of one email, before addressing."""

    subject: str
    text: str
    html: str


def _day(value: date | datetime) -> str:
    if isinstance(value, datetime):
        value = value.astimezone(UTC)
    return f"{value.day} {value:%B %Y}"


def _moment(value: datetime) -> str:
    moment = value.astimezone(UTC)
    return f"{moment.day} {moment:%B %Y, %H:%M} UTC"


def _sentence(value: str) -> str:
    """Callers pass fragments ("tax law requires ..."): start them upper-case and end them with a full stop."""
    value = str(value).strip()
    if not value:
        return value
    value = value[0].upper() + value[1:]
    return value if value[-1] in ".!?" else value + "."


def _environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False, default=False),
        undefined=StrictUndefined,  # a missing value fails the render instead of mailing a blank
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["day"] = _day
    environment.filters["moment"] = _moment
    environment.filters["sentence"] = _sentence
    return environment


_ENVIRONMENT = _environment()


def _check_context(kind: str, spec: _Kind, context: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the context of one kind and shape it for the templates (names keys, never values)."""
    unknown = sorted(set(context) - spec.required - spec.optional)
    if unknown:
        raise ValueError(f"{kind} email takes no {', '.join(unknown)}: it gets only what it needs")
    missing = sorted(spec.required - set(context))
    if missing:
        raise ValueError(f"{kind} email needs {', '.join(missing)}")
    values = {name: context.get(name) for name in spec.required | spec.optional}

    right = values["right"]
    if right not in RIGHT_LABELS:
        raise ValueError(f"{kind} email: no wording for right {right!r} (add it to RIGHT_LABELS)")
    values["right_label"] = RIGHT_LABELS[right]

    for name in ("due_at", "expires_at", "export_expires_at"):
        if values.get(name) is not None and not isinstance(values[name], date):
            raise ValueError(f"{kind} email: {name} must be a date or datetime")
    if kind == "verification_code" and not isinstance(values["expires_at"], datetime):
        raise ValueError("verification_code email: expires_at must be a datetime (the code expires within a day)")

    if kind == "completion":
        values["summary"] = [_summary_item(index, item) for index, item in enumerate(values["summary"] or [])]
        url, expires = values.get("export_url"), values.get("export_expires_at")
        if (url is None) != (expires is None):
            raise ValueError("completion email: export_url and export_expires_at go together")
        if url is not None and not (isinstance(url, str) and url.startswith(("https://", "http://"))):
            raise ValueError("completion email: export_url must be an http(s) URL")
    return values


def _summary_item(index: int, item: Any) -> dict[str, Any]:
    """One line of 'what we did': store and action, optional count and note (e.g. what was kept and why)."""
    if not isinstance(item, Mapping) or not {"store", "action"} <= set(item):
        raise ValueError(f"completion email: summary[{index}] needs store and action")
    unknown = sorted(set(item) - {"store", "action", "count", "note"})
    if unknown:
        raise ValueError(f"completion email: summary[{index}] takes no {', '.join(unknown)}")
    count = item.get("count")
    if count is not None and not isinstance(count, int):
        raise ValueError(f"completion email: summary[{index}].count must be an integer")
    return {"store": str(item["store"]), "action": str(item["action"]), "count": count, "note": item.get("note")}


def check_request_id(request_id: str) -> None:
    """Request ids end up in Message-IDs and subjects: refuse anything but plain id characters."""
    if not _REQUEST_ID.fullmatch(request_id):
        raise ValueError("request_id must be 1-100 characters of letters, digits, '_', '.', '-'")


def render(kind: str, request_id: str, context: Mapping[str, Any]) -> RenderedEmail:
    """Subject, plain text and HTML of one kind of email. Raises ValueError for an unknown kind or bad context."""
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown email kind {kind!r}; one of {', '.join(KINDS)}")
    check_request_id(request_id)
    values = _check_context(kind, spec, context)
    subject = spec.subject.format(request_id=request_id)
    values.update(request_id=request_id, subject=subject, contact=CONTACT_EMAIL, answer_days=ANSWER_DAYS)
    return RenderedEmail(
        subject=subject,
        text=_ENVIRONMENT.get_template(f"{kind}.txt").render(values),
        html=_ENVIRONMENT.get_template(f"{kind}.html").render(values),
    )


def message_id_for(request_id: str, kind: str) -> str:
    """Deterministic: a resend after a crash carries the same Message-ID, so mail systems can drop the copy."""
    check_request_id(request_id)
    return f"<{request_id}.{kind}@{MESSAGE_ID_DOMAIN}>"


# ---------------------------------------------------------------------------------------------------------------
# SMTP
# ---------------------------------------------------------------------------------------------------------------


def connect(smtp: SmtpSettings) -> smtplib.SMTP:
    """The one place an SMTP connection is built: plain, STARTTLS or implicit TLS, then login if configured."""
    context = ssl.create_default_context()
    client: smtplib.SMTP
    if smtp.security == "ssl":
        client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=smtp.timeout, context=context)
    else:
        client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
    try:
        if smtp.security == "starttls":
            client.starttls(context=context)
            client.ehlo()  # the capabilities change after STARTTLS (AUTH is often offered only now)
        if smtp.username:
            client.login(smtp.username, smtp.password.get_secret_value() if smtp.password else "")
    except BaseException:
        client.close()
        raise
    return client


def _deliver(
    smtp: SmtpSettings,
    message: EmailMessage,
    recipient: Pii,
    *,
    what: str,
    request_id: str | None = None,
    kind: str | None = None,
) -> None:
    """Send `message` to `recipient`: the one place the address is revealed.

    Failures become NotificationError naming `what` and the SMTP code only: the server's reply text and
    SMTPRecipientsRefused both carry the address, so neither is kept, and the error is raised outside the `except`
    so that no traceback chains the original exception.
    """
    failure: str | None = None
    code: int | None = None
    message["To"] = recipient.reveal()
    try:
        client = connect(smtp)
        try:
            client.send_message(message, from_addr=smtp.mail_from, to_addrs=[recipient.reveal()])
        finally:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                # The message was accepted already (or the send failed and is being reported): only close.
                client.close()
    except smtplib.SMTPRecipientsRefused as error:
        code = min(int(reply[0]) for reply in error.recipients.values())
        failure = f"recipient refused, SMTP {code}"
    except smtplib.SMTPResponseException as error:
        code = int(error.smtp_code)
        failure = f"SMTP {code} ({type(error).__name__})"
    except smtplib.SMTPException as error:
        failure = f"SMTP error ({type(error).__name__})"
    except OSError as error:  # refused, unreachable, timeout, TLS failure
        errno = f", errno {error.errno}" if error.errno else ""
        failure = f"cannot reach SMTP server {smtp.host}:{smtp.port} ({type(error).__name__}{errno})"
    finally:
        del message["To"]  # the address does not outlive the call
    if failure is not None:
        raise NotificationError(f"{what} not sent: {failure}", request_id=request_id, kind=kind, smtp_code=code)


def _message(
    smtp: SmtpSettings, *, subject: str, message_id: str, text_body: str, html_body: str | None = None
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = smtp.mail_from
    message["Reply-To"] = CONTACT_EMAIL
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = message_id
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no out-of-office replies to this mailbox
    message.set_content(text_body)
    if html_body is not None:
        message.add_alternative(html_body, subtype="html")
    return message


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

_CLAIM = text(
    f"INSERT INTO {SCHEMA}.notifications (request_id, kind, status, message_id, claimed_at) "
    "VALUES (:request_id, :kind, 'sending', :message_id, now()) ON CONFLICT (request_id, kind) DO NOTHING"
)
_LOCK = text(
    f"SELECT status, message_id FROM {SCHEMA}.notifications WHERE request_id = :request_id AND kind = :kind "
    "FOR UPDATE"
)
_MARK_SENT = text(
    f"UPDATE {SCHEMA}.notifications SET status = 'sent', sent_at = now() "
    "WHERE request_id = :request_id AND kind = :kind"
)


def send_once(
    engine: Engine,
    smtp_settings: SmtpSettings | Settings,
    *,
    request_id: str,
    kind: str,
    to: Pii,
    context: Mapping[str, Any],
) -> bool:
    """Send the `kind` email of a request unless it was sent already; True if this call sent it.

    1. Render first: a bad context raises ValueError before anything is claimed.
    2. Claim: INSERT the row as 'sending' with its deterministic Message-ID, ON CONFLICT DO NOTHING, committed on
       its own, so the row exists for every later caller to lock.
    3. In a second transaction, lock the row (SELECT ... FOR UPDATE). 'sent' -> return False. Otherwise send,
       mark 'sent' with sent_at and commit. A racing worker blocks on the lock until this commits, then sees
       'sent'. A row left 'sending' by a crashed run is not locked by anyone (PostgreSQL drops a dead session's
       locks), so the next call retries it. An SMTP failure rolls back: the row stays 'sending', and a rerun
       tries again.

    The remaining window: if the process dies (or the database becomes unreachable) after the SMTP server accepted
    the message but before the 'sent' commit, the row stays 'sending' and a rerun sends the email a second time.
    Closing it would need the SMTP server to take part in our transaction, which it cannot; the copy carries the
    same Message-ID, so mail systems that deduplicate by Message-ID show it once.

    The lock is held for the SMTP conversation (bounded by `timeout` per socket operation); a racing caller
    waits that long. Raises NotificationError on SMTP failure, ValueError on an unknown kind or bad context.
    """
    if not isinstance(to, Pii):
        raise TypeError("to must be a Pii: the address is personal data")
    smtp = _smtp(smtp_settings)
    rendered = render(kind, request_id, context)
    keys = {"request_id": request_id, "kind": kind}

    with engine.begin() as connection:
        connection.execute(_CLAIM, {**keys, "message_id": message_id_for(request_id, kind)})

    with engine.begin() as connection:
        row = connection.execute(_LOCK, keys).one()
        if row.status == "sent":
            return False
        message = _message(
            smtp,
            subject=rendered.subject,
            message_id=row.message_id,
            text_body=rendered.text,
            html_body=rendered.html,
        )
        _deliver(
            smtp, message, to, what=f"{kind} email for request {request_id}", request_id=request_id, kind=kind
        )
        connection.execute(_MARK_SENT, keys)
    return True


def send_operator_mail(smtp_settings: SmtpSettings | Settings, to: str, subject: str, text: str) -> None:
    """Plain-text mail to a compliance ops mailbox (e.g. a run summary). Not deduplicated: callers decide when.

    The address is a role mailbox, but errors still leave it out, like every other address.
    """
    smtp = _smtp(smtp_settings)
    message = _message(smtp, subject=subject, message_id=make_msgid(domain=MESSAGE_ID_DOMAIN), text_body=text)
    _deliver(smtp, message, Pii(to), what="operator mail")  # no subject: callers may put anything in it


# ---------------------------------------------------------------------------------------------------------------
# Notices to many people: breach notification (policy section 3) and policy changes (section 9)
#
# Not tied to a request: `privacy_ops.notices` sends one notice to thousands of accounts in batches, over one SMTP
# connection per batch, with its own exactly-once record per recipient (privacy_ops.notice_deliveries). Here: the
# wording (`<kind>.txt|.html` on `_notice_layout`), the message, and sending it on an open connection. A notice
# is the same text for everyone (no names): it is rendered once and addressed per recipient.
# ---------------------------------------------------------------------------------------------------------------

# How the policy's categories of personal data (section 1) read in a notice.
CATEGORY_LABELS: dict[str, str] = {
    "account": "account information (name, email address, phone number, password in hashed form)",
    "billing": "billing information (billing name, address and VAT number, invoices; cards are held by Stripe)",
    "content": "content you created or uploaded (projects, documents, assets, schemas)",
    "communications": "messages to our support team and survey answers",
    "usage": "usage data (pages visited, features used, API call volumes)",
    "device": "device information (browser, operating system, device identifiers, screen resolution)",
    "logs": "log data (IP addresses, access times, referring URLs, error logs)",
    "cookies": "cookie consents and preference settings",
}

# Notice references go into subjects and Message-IDs: "breach.<incident id>" or "policy.<version>".
_NOTICE_REFERENCE = re.compile(r"(breach|policy)\.[a-z0-9][a-z0-9.-]{1,80}")


@dataclass(frozen=True)
class _NoticeKind:
    subject: str  # str.format with reference and the context's values
    required: frozenset[str]
    optional: frozenset[str] = frozenset()


NOTICE_KINDS: dict[str, _NoticeKind] = {
    "breach_notice": _NoticeKind(
        "Important: a security incident involving your CellCMS data (ref. {reference})",
        frozenset({"description", "categories", "consequences", "measures", "detected_at"}),
        frozenset({"advice"}),
    ),
    "policy_notice": _NoticeKind(
        "We are updating the CellCMS Privacy Policy (version {version})",
        frozenset({"version", "effective_on", "changes", "policy_url"}),
    ),
}


class DeliveryUncertain(NotificationError):
    """The connection broke while a message was being handed over: the server may or may not have accepted it."""


class RecipientRefused(NotificationError):
    """The server refused this recipient (`smtp_code`); other recipients may still be sent to."""


def check_notice_reference(reference: str) -> None:
    if not _NOTICE_REFERENCE.fullmatch(reference):
        raise ValueError("notice reference must be 'breach.<id>' or 'policy.<version>' (a-z, 0-9, '.', '-')")


def _check_notice_context(kind: str, spec: _NoticeKind, context: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the context of one notice kind (names keys, never values) and shape it for the templates."""
    unknown = sorted(set(context) - spec.required - spec.optional)
    if unknown:
        raise ValueError(f"{kind} email takes no {', '.join(unknown)}: it gets only what it needs")
    missing = sorted(name for name in spec.required if context.get(name) in (None, "", []))
    if missing:
        raise ValueError(f"{kind} email needs {', '.join(missing)}")
    values: dict[str, Any] = {name: context.get(name) for name in spec.required | spec.optional}
    if kind == "breach_notice":
        categories = [str(c) for c in values["categories"]]
        unknown_categories = [c for c in categories if c not in CATEGORY_LABELS]
        if unknown_categories:
            raise ValueError(f"breach_notice email: no wording for {len(unknown_categories)} category(ies)")
        values["categories"] = [CATEGORY_LABELS[c] for c in categories]
        if not isinstance(values["detected_at"], datetime):
            raise ValueError("breach_notice email: detected_at must be a datetime")
    if kind == "policy_notice":
        if not isinstance(values["effective_on"], date):
            raise ValueError("policy_notice email: effective_on must be a date")
        if not str(values["policy_url"]).startswith("https://"):
            raise ValueError("policy_notice email: policy_url must be an https URL")
    return values


def render_notice(kind: str, reference: str, context: Mapping[str, Any]) -> RenderedEmail:
    """Subject, plain text and HTML of a notice; the same for every recipient. ValueError for bad input."""
    spec = NOTICE_KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown notice kind {kind!r}; one of {', '.join(NOTICE_KINDS)}")
    check_notice_reference(reference)
    values = _check_notice_context(kind, spec, context)
    subject = spec.subject.format(reference=reference, **values)
    values.update(reference=reference, subject=subject, contact=CONTACT_EMAIL)
    return RenderedEmail(
        subject=subject,
        text=_ENVIRONMENT.get_template(f"{kind}.txt").render(values),
        html=_ENVIRONMENT.get_template(f"{kind}.html").render(values),
    )


def notice_message_id(reference: str, account_id: int) -> str:
    """Deterministic per notice and recipient: any copy of one person's notice carries the same Message-ID."""
    check_notice_reference(reference)
    return f"<{reference}.{int(account_id)}@{MESSAGE_ID_DOMAIN}>"


# An address that can go into a header as it is (dot-atom local part, plain domain). Others take the slow path.
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9.-]{1,255}")


@dataclass(frozen=True)
class PreparedNotice:
    """A rendered notice serialised once (every header but To and Message-ID, CRLF line ends), so that each
    recipient's copy costs two header lines rather than a MIME build: thousands of recipients per run."""

    rendered: RenderedEmail
    data: bytes


def prepare_notice(smtp: SmtpSettings, rendered: RenderedEmail) -> PreparedNotice:
    message = _message(
        smtp, subject=rendered.subject, message_id="<x@x>", text_body=rendered.text, html_body=rendered.html
    )
    del message["Message-ID"]
    return PreparedNotice(rendered, message.as_bytes(policy=message.policy.clone(linesep="\r\n")))


def connect_for_notices(smtp: SmtpSettings) -> smtplib.SMTP:
    """`connect`, minus building a TLS context (it loads the CA bundle, ~0.1 s) for a plain connection: a notice
    opens one connection per batch, many batches per run."""
    if smtp.security != "none":
        return connect(smtp)
    client = smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout)
    try:
        if smtp.username:
            client.login(smtp.username, smtp.password.get_secret_value() if smtp.password else "")
    except BaseException:
        client.close()
        raise
    return client


def send_on(
    client: smtplib.SMTP, smtp: SmtpSettings, notice: PreparedNotice, to: Pii, message_id: str, *, what: str
) -> None:
    """Send one recipient's copy of `notice` on an open connection (from `connect`); the address is revealed only
    here.

    Raises RecipientRefused when the server refused this recipient, NotificationError when it refused the sender
    or the data (`smtp_code` set; certainly not accepted), DeliveryUncertain when the connection broke or timed
    out while handing it over (it may have been accepted). Messages name `what` and the SMTP code, never the
    address.
    """
    failure: str | None = None
    code: int | None = None
    uncertain = refused = False
    try:
        address = to.reveal()
        if _PLAIN_ADDRESS.fullmatch(address):
            head = f"To: {address}\r\nMessage-ID: {message_id}\r\n".encode("ascii")
            client.sendmail(smtp.mail_from, [address], head + notice.data)
        else:  # quoted local parts, international addresses: let the email package encode them
            message = _message(
                smtp,
                subject=notice.rendered.subject,
                message_id=message_id,
                text_body=notice.rendered.text,
                html_body=notice.rendered.html,
            )
            message["To"] = address
            client.send_message(message, from_addr=smtp.mail_from, to_addrs=[address])
    except smtplib.SMTPRecipientsRefused as error:
        code = min(int(reply[0]) for reply in error.recipients.values())
        failure, refused = f"recipient refused, SMTP {code}", True
    except smtplib.SMTPResponseException as error:
        code = int(error.smtp_code)
        failure = f"SMTP {code} ({type(error).__name__})"
    except (smtplib.SMTPException, OSError) as error:  # disconnected, timed out, TLS broke: mid-conversation
        uncertain = True
        failure = f"connection to SMTP server {smtp.host}:{smtp.port} lost ({type(error).__name__})"
    except (ValueError, UnicodeError) as error:  # an address the email package cannot encode
        failure, refused = f"address not usable ({type(error).__name__})", True
    if failure is not None:
        if uncertain:
            raise DeliveryUncertain(f"{what}: {failure}; the server may have accepted it")
        if refused:
            raise RecipientRefused(f"{what} not sent: {failure}", smtp_code=code)
        raise NotificationError(f"{what} not sent: {failure}", smtp_code=code)


def send_operator_mail_once(
    engine: Engine,
    smtp_settings: SmtpSettings | Settings,
    *,
    key: str,
    kind: str,
    to: str,
    subject: str,
    text: str,
) -> bool:
    """`send_operator_mail` once per (key, kind), with `send_once`'s protocol and window; True if sent now."""
    keys = {"request_id": key, "kind": kind}
    with engine.begin() as connection:
        connection.execute(_CLAIM, {**keys, "message_id": make_msgid(domain=MESSAGE_ID_DOMAIN)})
    with engine.begin() as connection:
        if connection.execute(_LOCK, keys).one().status == "sent":
            return False
        send_operator_mail(smtp_settings, to, subject, text)
        connection.execute(_MARK_SENT, keys)
    return True
