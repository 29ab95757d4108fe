"""What outside text may be shown (reconciler/core/safe_text.py): redaction that cannot
mangle a message or show where a secret stands (one-letter and common-word passwords), and
escaping that keeps a run id holding a newline, U+202E or an ANSI escape on its line, in
the text log, the status table and error lines."""

from __future__ import annotations

import logging

import pytest

from reconciler.adapters.airflow import AirflowClient, AirflowUnavailable
from reconciler.cli.app import CommandError
from reconciler.cli.operate_cmds import _print_status
from reconciler.core.safe_text import printable, redact
from reconciler.core.settings import AirflowSettings
from reconciler.service.observability import JsonFormatter, TextFormatter
from tests.fixtures.etcd import free_port

HOSTILE = "manual__x\nERROR forged line\u202eevil\x1b[31mred\u2028"
MESSAGE = ("POST http://127.0.0.1:8080/api/v2/dags/02_pipeline/dagRuns answered 500: "
           "Internal Server Error (password rejected)")


@pytest.mark.parametrize("password", ["p", "h", "t", "1", ":", "/", "http", "api", "127.0.0.1",
                                      "8080", "password", "airflow", "Internal", "dagRuns",
                                      "answered 500"])
def test_a_short_or_common_password_neither_mangles_nor_locates(password: str) -> None:
    assert redact(MESSAGE, [password]) == MESSAGE


def test_a_long_secret_is_replaced_where_it_stands_as_a_whole_token() -> None:
    token = "ghp_9f8e7d6c5b4a"
    assert redact(f"refused {token} for 02", [token]) == "refused *** for 02"
    assert redact(f'{{"input": "{token}"}}', [token]) == '{"input": "***"}'
    # inside a longer token it is not a whole token: nothing is cut out of the middle
    assert redact(f"x{token}y", [token]) == f"x{token}y"


@pytest.mark.parametrize(("text", "shown"), [
    ("clone of https://bot:p@git.example.com/r.git failed",
     "clone of https://git.example.com/r.git failed"),
    ("https://u:p@ss@h.example/x?q=a@b", "https://h.example/x?q=a@b"),
    ("https://host/path?q=a@b", "https://host/path?q=a@b"),
    ("Authorization: Basic dXNlcjpw", "Authorization: Basic ***"),
    ('{"Authorization": "Bearer abc.def"}', '{"Authorization": "Bearer ***"}'),
    ("sent bearer 0123456789abcdef", "sent bearer ***"),
    ("bearer authentication failed", "bearer authentication failed"),
    ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl expired",
     "token *** expired"),
    ('{"username": "admin", "password": "p"}', '{"username": "admin", "password": "***"}'),
    ("{'access_token': 'x'}", "{'access_token': \"***\"}"),
    ("GET /x?access_token=p&limit=5", "GET /x?access_token=***&limit=5"),
    ("RECONCILER_AIRFLOW_PASSWORD=p exported", "RECONCILER_AIRFLOW_PASSWORD=*** exported"),
    ("wrong password for user admin", "wrong password for user admin"),
])
def test_credentials_are_removed_where_they_are_written(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_the_airflow_clients_messages_keep_their_url_with_a_one_letter_password() -> None:
    port = free_port()  # nothing listens: a refused connection, at once
    api = AirflowClient(AirflowSettings(url=f"http://127.0.0.1:{port}", username="admin",
                                        password="p", timeout=1, retries=1))
    with pytest.raises(AirflowUnavailable) as info:
        api.health()
    message = str(info.value)
    assert f"http://127.0.0.1:{port}" in message
    assert "***" not in message
    # an answer echoing the request still loses the password, wherever it is written
    assert api._redact('{"detail": {"input": {"password": "p"}}}') == (
        '{"detail": {"input": {"password": "***"}}}')


@pytest.mark.parametrize(("value", "shown"), [
    ("reconciler__2026-01-01T00:00:00+00:00", "reconciler__2026-01-01T00:00:00+00:00"),
    ("run with spaces/%#ünïcode", "run with spaces/%#ünïcode"),
    ("a\nb", "a\\nb"),
    ("a\r\tb", "a\\r\\tb"),
    ("\u202eabc", "\\u202eabc"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("line\u2028sep", "line\\u2028sep"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("a\\nb", "a\\\\nb"),  # a literal backslash-n cannot pass for an escaped newline
    ("\U000e0041tag", "\\U000e0041tag"),
])
def test_printable_escapes_control_and_bidi_characters(value: str, shown: str) -> None:
    assert printable(value) == shown
    assert printable(value).isprintable()


def test_the_text_log_keeps_a_hostile_run_id_on_one_line_and_json_keeps_it_exact() -> None:
    record = logging.LogRecord("reconciler", logging.INFO, __file__, 1,
                               "triggered %s", (HOSTILE,), None)
    record.fields = {"run_id": HOSTILE, "dag_id": "02_pipeline"}
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert "\u202e" not in line
    assert "\x1b" not in line
    assert "\u2028" not in line
    assert "run_id=manual__x\\nERROR forged line\\u202eevil\\x1b[31mred\\u2028" in line
    assert line.count("triggered manual__x\\nERROR") == 1
    import json

    data = json.loads(JsonFormatter().format(record))
    assert data["run_id"] == HOSTILE
    assert data["message"] == f"triggered {HOSTILE}"


def test_a_traceback_in_the_text_log_keeps_its_lines() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord("reconciler", logging.ERROR, __file__, 1, "pass failed",
                                   (), sys.exc_info())
    line = TextFormatter().format(record)
    assert "pass failed\nTraceback" in line


def test_the_status_table_escapes_run_ids_and_reasons(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    header = {"commit": "abc", "synced_at": "now", "source_of_status": "etcd mirror",
              "leader": "r1\x1b[2J", "last_pass": "then",
              "suspended": {"03_pipeline": {"by": "ops\n", "at": "now", "reason": HOSTILE}}}
    rows = [{"cycle": "2026-01-01T00:00:00+00:00", "dag_id": "02_pipeline", "state": "failed",
             "message": f"run {HOSTILE} failed"}]
    _print_status(header, rows)
    out = capsys.readouterr().out
    assert "\u202e" not in out
    assert "\x1b" not in out
    assert "ERROR forged line" in out
    assert not any(line.startswith("ERROR") for line in out.splitlines())
    assert len(out.splitlines()) == 5  # commit, leader, suspended, cycle, one row: no more
    assert "run manual__x\\nERROR forged line\\u202eevil\\x1b[31mred\\u2028 failed" in out


def test_an_error_line_stays_one_line_and_in_order() -> None:
    error = CommandError(f"run {HOSTILE} of 02 not found")
    assert "\n" not in error.message
    assert "\u202e" not in error.message
    assert "\\u202e" in error.message
