"""Reusable click option groups: each adds its flags (with the environment variables fixed
in DESIGN section 7) and hands the command one settings object instead of loose values.

Secrets never come from a flag: the etcd password is read from RECONCILER_ETCD_PASSWORD or
from a file named by --etcd-password-file, so it stays out of shell history and `ps`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from reconciler.core.settings import EtcdSettings

F = Callable[..., Any]

ETCD_PASSWORD_ENV = "RECONCILER_ETCD_PASSWORD"


def _apply(func: F, options: Sequence[Callable[[F], F]]) -> F:
    for option in reversed(options):
        func = option(func)
    return func


# --- etcd ----------------------------------------------------------------------------------

def parse_endpoints(text: str) -> tuple[str, ...]:
    """'a:2379, b:2379' -> ('a:2379', 'b:2379'); each must be host:port (http(s):// allowed)."""
    endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
    if not endpoints:
        raise click.BadParameter("no endpoint given", param_hint="--etcd-endpoints")
    for endpoint in endpoints:
        bare = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
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
        try:
            password = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {password_file}: {exc}",
                                     param_hint="--etcd-password-file") from None
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
                 default="127.0.0.1:2379", show_default=True,
                 help="Comma-separated host:port of the etcd cluster, tried in order "
                 "[RECONCILER_ETCD_ENDPOINTS]."),
    click.option("--etcd-prefix", envvar="RECONCILER_ETCD_PREFIX", default="reconciler",
                 show_default=True, help="First segment of every key [RECONCILER_ETCD_PREFIX]."),
    click.option("--namespace", envvar="RECONCILER_NAMESPACE", default="default",
                 show_default=True,
                 help="Keys live under /<prefix>/<namespace>/ [RECONCILER_NAMESPACE]."),
    click.option("--etcd-user", envvar="RECONCILER_ETCD_USER", default=None,
                 help="etcd user [RECONCILER_ETCD_USER]; the password comes from "
                 "RECONCILER_ETCD_PASSWORD or --etcd-password-file, never from a flag."),
    click.option("--etcd-password-file", type=_file, default=None,
                 help="Read the etcd password from this file."),
    click.option("--etcd-ca", envvar="RECONCILER_ETCD_CA", type=_file, default=None,
                 help="CA bundle to verify etcd's TLS certificate (turns TLS on) "
                 "[RECONCILER_ETCD_CA]."),
    click.option("--etcd-cert", envvar="RECONCILER_ETCD_CERT", type=_file, default=None,
                 help="Client certificate for TLS [RECONCILER_ETCD_CERT]."),
    click.option("--etcd-key", envvar="RECONCILER_ETCD_KEY", type=_file, default=None,
                 help="Key of the client certificate [RECONCILER_ETCD_KEY]."),
    click.option("--etcd-timeout", envvar="RECONCILER_ETCD_TIMEOUT",
                 type=click.FloatRange(min=0.1, max=300), default=5.0, show_default=True,
                 help="Seconds for one etcd request; a one-shot command gives up after one "
                 "timeout per endpoint [RECONCILER_ETCD_TIMEOUT]."),
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
