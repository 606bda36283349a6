"""Finding the planted hard cases in a seeded sandbox, by SQL against what was actually loaded.

Each entry of `SUBJECT_HARD_CASES` is a query giving the account ids (column `account_id`) of the people a hard
case concerns. `demo_subjects()` returns the accounts that carry all of them at once: the people to run the demo
and the end-to-end tests with. Accounts 1..10 are built to qualify (see `cellcms_sandbox.synthetic`), others do by
chance. `OTHER_HARD_CASES` are population-level oddities (unflagged minors, soft-deleted accounts, ...).
"""

from __future__ import annotations

import psycopg

from cellcms_sandbox.database import psycopg_conninfo

# An email inside free text (the domain ends on a letter or digit, so "x@y.example:" yields "x@y.example").
_EMAIL_PATTERN = r"[A-Za-z0-9._+-]+@[A-Za-z0-9.-]*[A-Za-z0-9]"

SUBJECT_HARD_CASES: dict[str, str] = {
    # A collaborator (project_members row) who authored documents in a project another account owns.
    "collaborator_author": """
        SELECT DISTINCT d.author_account_id AS account_id
        FROM documents d
        JOIN projects p ON p.id = d.project_id
        JOIN project_members m ON m.project_id = p.id AND m.account_id = d.author_account_id
        WHERE d.author_account_id <> p.owner_account_id""",
    # Another account's own document names the person (full name), in a project the person collaborates on.
    "named_in_others_document": """
        SELECT DISTINCT a.id AS account_id
        FROM accounts a
        JOIN project_members m ON m.account_id = a.id
        JOIN projects p ON p.id = m.project_id AND p.owner_account_id <> a.id
        JOIN documents d ON d.project_id = p.id AND d.author_account_id = p.owner_account_id
        WHERE strpos(d.body, a.full_name) > 0""",
    "email_in_document_body": """
        SELECT DISTINCT a.id AS account_id
        FROM documents d JOIN accounts a ON a.id = d.author_account_id
        WHERE strpos(d.body, a.email) > 0""",
    # support_messages reach the account only through support_tickets.
    "identifier_in_support_message": """
        SELECT DISTINCT a.id AS account_id
        FROM support_messages m
        JOIN support_tickets t ON t.id = m.ticket_id
        JOIN accounts a ON a.id = t.account_id
        WHERE strpos(m.body, a.email) > 0 OR (a.phone IS NOT NULL AND strpos(m.body, a.phone) > 0)""",
    "identifier_in_survey_free_text": """
        SELECT DISTINCT a.id AS account_id
        FROM survey_responses s JOIN accounts a ON a.id = s.account_id
        WHERE strpos(s.free_text, a.full_name) > 0 OR strpos(s.free_text, a.email) > 0""",
    "email_in_error_log": """
        SELECT DISTINCT a.id AS account_id
        FROM error_logs e JOIN accounts a ON a.id = e.account_id
        WHERE strpos(e.message, a.email) > 0""",
    # No account_id, but the message names the person and the IP is theirs (their cookie consent's IP).
    "anonymous_error_log_with_email_and_ip": f"""
        SELECT DISTINCT a.id AS account_id
        FROM error_logs e
        JOIN accounts a ON a.email = substring(e.message from '{_EMAIL_PATTERN}')
        JOIN cookie_consents c ON c.account_id = a.id AND c.ip_address = e.ip_address
        WHERE e.account_id IS NULL""",
    "ip_in_referrer": r"""
        SELECT DISTINCT l.account_id
        FROM access_logs l
        WHERE l.referrer ~ '^https?://\d{1,3}(\.\d{1,3}){3}[:/]'""",
    "email_in_referrer": """
        SELECT DISTINCT a.id AS account_id
        FROM access_logs l JOIN accounts a ON a.id = l.account_id
        WHERE strpos(l.referrer, '?email=' || a.email) > 0""",
    # asset_versions reach the account only through assets -> projects; these have an object in S3.
    "asset_versions_in_s3": """
        SELECT DISTINCT p.owner_account_id AS account_id
        FROM asset_versions v
        JOIN assets s ON s.id = v.asset_id
        JOIN projects p ON p.id = s.project_id
        WHERE v.s3_version_id IS NOT NULL""",
    "invoices": "SELECT DISTINCT account_id FROM invoices WHERE account_id IS NOT NULL",
    "stripe_customer": "SELECT account_id FROM billing_profiles",
}

OTHER_HARD_CASES: dict[str, str] = {
    # Under 16 by birth date, but never flagged: an age check must look at birth_date itself.
    "unflagged_minor": """
        SELECT id AS account_id FROM accounts
        WHERE birth_date > current_date - interval '16 years' AND NOT is_minor_flagged""",
    "flagged_minor": "SELECT id AS account_id FROM accounts WHERE is_minor_flagged",
    "soft_deleted_account": "SELECT id AS account_id FROM accounts WHERE deleted_at IS NOT NULL",
    # Invoices kept for tax law, but no billing profile any more.
    "former_customer_with_invoices": """
        SELECT DISTINCT i.account_id FROM invoices i
        LEFT JOIN billing_profiles b ON b.account_id = i.account_id
        WHERE i.account_id IS NOT NULL AND b.account_id IS NULL""",
    "invoices_older_than_7_years": """
        SELECT DISTINCT account_id FROM invoices WHERE issued_at < current_date - interval '7 years'""",
}


def hard_case_counts(database_url: str) -> dict[str, int]:
    """How many accounts each hard case concerns (subject and population-level cases)."""
    with psycopg.connect(psycopg_conninfo(database_url)) as connection:
        return {
            name: int(connection.execute(f"SELECT count(*) FROM ({query}) AS hard_case").fetchone()[0])  # type: ignore[index]
            for name, query in {**SUBJECT_HARD_CASES, **OTHER_HARD_CASES}.items()
        }


def demo_subjects(database_url: str, limit: int | None = 10) -> list[int]:
    """Ids of live (not soft-deleted) accounts that carry every subject hard case, lowest first."""
    intersection = "\nINTERSECT\n".join(
        f"SELECT account_id FROM ({query}) AS q" for query in SUBJECT_HARD_CASES.values()
    )
    query = f"""
        SELECT a.id FROM accounts a
        WHERE a.deleted_at IS NULL AND a.id IN ({intersection})
        ORDER BY a.id"""
    with psycopg.connect(psycopg_conninfo(database_url)) as connection:
        if limit is None:
            return [row[0] for row in connection.execute(query)]
        return [row[0] for row in connection.execute(query + " LIMIT %s", (limit,))]
