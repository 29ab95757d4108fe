"""The root command group and the one place where errors become exit codes.

Exit codes (DESIGN section 7): 0 ok, 1 a check failed or a change was refused, 2 usage or
environment error (etcd or Airflow unreachable, no such repository, an unreadable file).
A failure prints one clear line on stderr, never a traceback, and never a credential.

Every option has an environment variable: the shared ones are named explicitly (the
names of DESIGN section 7, e.g. RECONCILER_ETCD_ENDPOINTS); any other option gets
RECONCILER_<COMMAND>_<OPTION> (click's auto_envvar_prefix), e.g.
RECONCILER_VALIDATE_OUTPUT or RECONCILER_SYNC_ALLOW_EMPTY.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import IO, Any, NoReturn, TypeVar

import click

from reconciler import __version__
from reconciler.core.problems import redact
from reconciler.core.safe_text import printable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ENVIRONMENT = 2
ENVVAR_PREFIX = "RECONCILER"

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(click.ClickException):
    """An expected failure: printed as one line (`error: ...`), exits with `code`.

    A ClickException, so it is one line also where it is raised outside a command's body
    (an option's callback, the settings wrappers of options.py).
    """

    def __init__(self, message: str, code: int = EXIT_ENVIRONMENT) -> None:
        # One line: newlines become spaces, other control and bidi characters are escaped.
        super().__init__(printable(" ".join(redact(message).split("\n"))))
        self.code = code
        self.exit_code = code  # type: ignore[misc]  # per error, not per class

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.message}", err=True, file=file)


def fail(message: str, code: int = EXIT_ENVIRONMENT) -> NoReturn:
    raise CommandError(message, code)


def handle_errors(func: F) -> F:
    """Turn CommandError, an OSError from the environment (a full disk, a closed pipe) and
    an interrupted run into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CommandError as exc:
            exc.show()
            sys.exit(exc.code)
        except OSError as exc:
            click.echo(f"error: {redact(str(exc))}", err=True)
            sys.exit(EXIT_ENVIRONMENT)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                               "auto_envvar_prefix": ENVVAR_PREFIX})
@click.version_option(__version__, prog_name="reconciler")
def main() -> None:
    """GitOps-managed dependencies between Airflow DAGs, reconciled through etcd.

    Pipeline files live in git under pipelines/; `validate`, `graph` and `diff` check and
    show them in CI; `sync` writes a commit's graph to etcd; `run` keeps Airflow in step.
    Every option can also be set by an environment variable (shown in each --help).
    """
