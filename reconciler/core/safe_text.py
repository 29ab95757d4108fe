"""What text from outside (Airflow, etcd, git, a URL) may be shown: credentials taken out
(`redact`), control and bidi characters escaped (`printable`).

Redaction is structural: it removes what sits where credentials are written (the userinfo
of a URL, an Authorization header, a bearer token, a JWT, the value of a field named like a
password or token), whatever the credential is. A known secret (the password or token this
process holds) is searched for in free text only when it is long and not a plain word or
number, and only as a whole token: a one-letter password or one that is also an ordinary
word ("airflow", "password") would otherwise turn `http://` into `htt***://`, and the
stars would show where it stands. Such a secret is still removed wherever credentials are
written.

`printable` keeps one value on one line and in its reading order: a run id holding a
newline, an ANSI escape or U+202E (right-to-left override) cannot forge an output or log
line or reorder what follows. JSON output needs none of it (it is exact data).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "***"

MIN_SECRET_LENGTH = 8
"""A known secret shorter than this is never searched for in free text (it would match
inside ordinary words and show where it occurs)."""

# scheme://userinfo@host: the userinfo (user, user:password, a token) goes. It ends at the
# last "@" before the path, query or fragment (an unencoded "@" in a password included).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")
# An Authorization header (or a field of that name), whatever its scheme.
_AUTH_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
    r"(?:(basic|bearer|digest|token|negotiate)\s+)?[^\s\"',;]+")
# "Bearer <credential>" in free text: the credential has a digit or token punctuation,
# so prose ("bearer authentication") is left alone.
_BEARER = re.compile(r"(?i)\b(bearer\s+)(?=[\w.~+/=-]*[\d.~+/=-])[\w.~+/=-]{8,}")
# A JSON Web Token anywhere: header.payload.signature, base64url, header starting {"
_JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
_SECRET_NAME = r"[\w.-]*(?:password|passwd|secret|token|api[_-]?key|credential)[\w.-]*"
# "password": "..." (JSON) or 'token': '...' (a Python repr)
_QUOTED_FIELD = re.compile(
    rf"""(?i)(["']{_SECRET_NAME}["']\s*:\s*)(?:"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')""")
# password=... (a query, a form, an environment line)
_ASSIGNED_FIELD = re.compile(rf"(?i)\b({_SECRET_NAME}=)[^&\s\"',;]+")
# What may stand right before and after a known secret for it to be a whole token.
_EDGE = r"\s\"'`,;()\[\]{}<>="


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` without credentials: structurally (module docstring), and each of `secrets`
    long enough to be searched for where it stands as a whole token."""
    text = _USERINFO.sub(r"\1", text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + (f"{m.group(2)} " if m.group(2) else "")
                            + REDACTED, text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    text = _JWT.sub(REDACTED, text)
    text = _QUOTED_FIELD.sub(rf'\1"{REDACTED}"', text)
    text = _ASSIGNED_FIELD.sub(rf"\1{REDACTED}", text)
    for secret in sorted({s for s in secrets if s and searchable(s)}, key=len, reverse=True):
        text = re.sub(rf"(?<![^{_EDGE}]){re.escape(secret)}(?![^{_EDGE}])", REDACTED, text)
    return text


def searchable(secret: str) -> bool:
    """Whether a known secret is looked for in free text: long, and neither a plain word
    nor a plain number (those occur in ordinary text, where replacing them mangles it)."""
    return (len(secret) >= MIN_SECRET_LENGTH and not secret.isalpha()
            and not secret.isdigit())


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(value: object) -> str:
    """`value` as one line of text in its reading order: control characters, bidi
    controls (U+202E ...), line and paragraph separators and other unprintable characters
    escaped as \\n, \\x1b, \\u202e; a backslash doubled, so an escape cannot be forged."""
    text = str(value)
    if text.isprintable() and "\\" not in text:
        return text  # the common case, without a look at each character
    return "".join(c if c.isprintable() and c != "\\" else _escape(c) for c in text)


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
