"""Reusable click options: the CLI contract in one place.

- `output_option(...)`: `-o/--output` on every command that prints data, `--format` kept
  as an alias.
- `seconds_option(...)`, `parse_seconds_callback`, `parse_duration_callback`: wherever a
  time is given, `5`, `5s`, `2m`, `1h`, `2d` all work.
- `json_answer(kind, data)`: every JSON answer is an object with a `kind` field.
- `read_secret_file(path, option)`: a password file, read bounded, UTF-8 text only.
- `etcd_options`: the --etcd-* flags (with the environment variables fixed in DESIGN
  section 7), handed to the command as one EtcdSettings.

Secrets never come from a flag: the etcd password is read from RECONCILER_ETCD_PASSWORD or
from a file named by --etcd-password-file, so it stays out of shell history and `ps`.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import click

from reconciler.cli.app import EXIT_ENVIRONMENT, CommandError
from reconciler.core.problems import redact
from reconciler.core.settings import EtcdSettings, parse_duration

F = Callable[..., Any]

ETCD_PASSWORD_ENV = "RECONCILER_ETCD_PASSWORD"
MAX_SECRET_BYTES = 64 * 1024


def _apply(func: F, options: Sequence[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


# --- the output contract -------------------------------------------------------------------

def output_option(choices: Sequence[str], default: str, help: str = "") -> Callable[[F], F]:
    """`-o/--output FORMAT` (alias `--format`), passed to the command as `output`.

    Its environment variable is RECONCILER_<COMMAND>_OUTPUT (the group's auto prefix).
    """
    text = "Output format" + (f"; {help}" if help else ".")
    return click.option("-o", "--output", "--format", "output", type=click.Choice(choices),
                        default=default, show_default=True, show_envvar=True, help=text)


def json_answer(kind: str, data: dict[str, Any] | None = None, **fields: Any) -> str:
    """The JSON text of an answer: an object whose first field is `kind` (e.g. "History",
    "SyncResult"), so a script can tell answers apart and add fields compatibly."""
    body = {"kind": kind, **(data or {}), **fields}
    body["kind"] = kind
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


# --- durations ---------------------------------------------------------------------------------

def parse_duration_callback(_ctx: click.Context | None, param: click.Parameter | None,
                            value: Any) -> timedelta | None:
    """click callback: '2d', '6h', '30m', '90s' or plain seconds -> timedelta."""
    if value is None or isinstance(value, timedelta):
        return value
    try:
        return parse_duration(str(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


def parse_seconds_callback(_ctx: click.Context | None, param: click.Parameter | None,
                           value: Any) -> float | None:
    """click callback: the same forms as parse_duration_callback -> float seconds."""
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    parsed = parse_duration_callback(_ctx, param, value)
    return None if parsed is None else parsed.total_seconds()


def seconds_option(*decls: str, default: float, minimum: float = 0.0,
                   maximum: float | None = None, **kwargs: Any) -> Callable[[F], F]:
    """An option holding a time, given as `5`, `5s`, `2m`, ...; the command gets seconds."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> float:
        seconds = parse_seconds_callback(ctx, param, value)
        assert seconds is not None
        if seconds < minimum or (maximum is not None and seconds > maximum):
            upper = f" and {maximum:g}s" if maximum is not None else ""
            raise click.BadParameter(f"{value!r} is not between {minimum:g}s{upper}",
                                     param=param)
        return seconds

    return click.option(*decls, default=f"{default:g}", callback=callback, show_default=True,
                        metavar="DURATION", **kwargs)


# --- secrets -------------------------------------------------------------------------------

def read_secret_file(path: str, option: str) -> str:
    """The secret in a file (one line; a final newline is dropped).

    Read bounded and only from a regular file (a FIFO would block, /dev/zero never ends),
    as UTF-8 text without control characters (a binary file would reach etcd's gRPC
    metadata). Every refusal is one line, exit 2, and never shows the content.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        why = "permission denied" if exc.errno == errno.EACCES else (
            exc.strerror or str(exc)).lower()
        raise CommandError(f"{option} {path}: cannot read: {why}", EXIT_ENVIRONMENT
                           ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CommandError(f"{option} {path}: not a regular file", EXIT_ENVIRONMENT)
        if st.st_size > MAX_SECRET_BYTES:
            raise CommandError(f"{option} {path}: {st.st_size} bytes is too large for a "
                               "password file", EXIT_ENVIRONMENT)
        raw = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise CommandError(f"{option} {path}: not UTF-8 text (byte {exc.start + 1} of "
                           f"{len(raw)}); write the password as text", EXIT_ENVIRONMENT
                           ) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise CommandError(f"{option} {path}: the file is empty", EXIT_ENVIRONMENT)
    if not text.isprintable():
        raise CommandError(f"{option} {path}: holds a control character or a second line; "
                           "write only the password", EXIT_ENVIRONMENT)
    return text


# --- etcd ----------------------------------------------------------------------------------

def parse_endpoints(text: str) -> tuple[str, ...]:
    """'a:2379, b:2379' -> ('a:2379', 'b:2379'); each must be host:port (http(s):// allowed)."""
    endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
    if not endpoints:
        raise click.BadParameter("no endpoint given", param_hint="--etcd-endpoints")
    for endpoint in endpoints:
        bare = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
        if "@" in bare:
            # Never echo it: the part before @ is a credential.
            raise click.BadParameter(f"{redact(endpoint)!r}: credentials do not belong in "
                                     "an endpoint; use RECONCILER_ETCD_USER and "
                                     "RECONCILER_ETCD_PASSWORD", param_hint="--etcd-endpoints")
        host, _, port = bare.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter(f"{endpoint!r} is not host:port",
                                     param_hint="--etcd-endpoints")
    return endpoints


def etcd_settings(*, endpoints: str, prefix: str, namespace: str, user: str | None,
                  password_file: str | None, ca: str | None, cert: str | None,
                  key: str | None, timeout: float,
                  environ: dict[str, str] | None = None) -> EtcdSettings:
    """The values of the --etcd-* options (and the password's sources) as EtcdSettings."""
    env = os.environ if environ is None else environ
    password: str | None = None
    if password_file:
        password = read_secret_file(password_file, "--etcd-password-file")
    elif env.get(ETCD_PASSWORD_ENV):
        password = env[ETCD_PASSWORD_ENV]
    if password is not None and not user:
        raise click.UsageError("an etcd password is set but no user: set RECONCILER_ETCD_USER "
                               "(or --etcd-user)")
    if user and password is None:
        raise click.UsageError(f"etcd user {user!r} needs a password: set {ETCD_PASSWORD_ENV} "
                               "or --etcd-password-file")
    if bool(cert) != bool(key):
        raise click.UsageError("--etcd-cert and --etcd-key go together (a client certificate "
                               "and its key)")
    for name, value in (("--etcd-prefix", prefix), ("--namespace", namespace)):
        if not value.strip("/") or any(c.isspace() for c in value):
            raise click.BadParameter(f"{value!r} cannot be part of an etcd key",
                                     param_hint=name)
    return EtcdSettings(endpoints=parse_endpoints(endpoints), prefix=prefix,
                        namespace=namespace, user=user or None, password=password,
                        ca=ca, cert=cert, key=key, timeout=timeout)


_file = click.Path(exists=True, dir_okay=False)

_ETCD_OPTIONS: list[Callable[[F], F]] = [
    click.option("--etcd-endpoints", envvar="RECONCILER_ETCD_ENDPOINTS",
                 default="127.0.0.1:2379", show_default=True, show_envvar=True,
                 help="Comma-separated host:port of the etcd cluster, tried in order."),
    click.option("--etcd-prefix", envvar="RECONCILER_ETCD_PREFIX", default="reconciler",
                 show_default=True, show_envvar=True, help="First segment of every key."),
    click.option("--namespace", envvar="RECONCILER_NAMESPACE", default="default",
                 show_default=True, show_envvar=True,
                 help="Keys live under /<prefix>/<namespace>/."),
    click.option("--etcd-user", envvar="RECONCILER_ETCD_USER", default=None, show_envvar=True,
                 help="etcd user; the password comes from RECONCILER_ETCD_PASSWORD or "
                 "--etcd-password-file, never from a flag."),
    click.option("--etcd-password-file", envvar="RECONCILER_ETCD_PASSWORD_FILE", type=_file,
                 default=None, show_envvar=True, help="Read the etcd password from this file."),
    click.option("--etcd-ca", envvar="RECONCILER_ETCD_CA", type=_file, default=None,
                 show_envvar=True,
                 help="CA bundle to verify etcd's TLS certificate (turns TLS on)."),
    click.option("--etcd-cert", envvar="RECONCILER_ETCD_CERT", type=_file, default=None,
                 show_envvar=True, help="Client certificate for TLS."),
    click.option("--etcd-key", envvar="RECONCILER_ETCD_KEY", type=_file, default=None,
                 show_envvar=True, help="Key of the client certificate."),
    seconds_option("--etcd-timeout", envvar="RECONCILER_ETCD_TIMEOUT", default=5.0,
                   minimum=0.1, maximum=300, show_envvar=True,
                   help="Deadline of one etcd request (5, 5s, 1m); a one-shot command gives "
                   "up after one timeout per endpoint."),
]


def etcd_options(func: F) -> F:
    """Add the --etcd-* options; the command receives them as one `etcd: EtcdSettings`."""

    @functools.wraps(func)
    def wrapper(*args: Any, etcd_endpoints: str, etcd_prefix: str, namespace: str,
                etcd_user: str | None, etcd_password_file: str | None, etcd_ca: str | None,
                etcd_cert: str | None, etcd_key: str | None, etcd_timeout: float,
                **kwargs: Any) -> Any:
        kwargs["etcd"] = etcd_settings(
            endpoints=etcd_endpoints, prefix=etcd_prefix, namespace=namespace,
            user=etcd_user, password_file=etcd_password_file, ca=etcd_ca, cert=etcd_cert,
            key=etcd_key, timeout=etcd_timeout)
        return func(*args, **kwargs)

    return _apply(wrapper, _ETCD_OPTIONS)
