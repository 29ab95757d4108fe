"""The root command group and the one place where errors become exit codes.

Exit codes (DESIGN section 7): 0 ok, 1 a check failed or a change was refused, 2 usage or
environment error (etcd or Airflow unreachable, no such repository). A failure prints one
clear line on stderr, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from reconciler import __version__

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ENVIRONMENT = 2

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(Exception):
    """An expected failure: printed as one line, exits with `code`."""

    def __init__(self, message: str, code: int = EXIT_ENVIRONMENT) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def fail(message: str, code: int = EXIT_ENVIRONMENT) -> NoReturn:
    raise CommandError(message, code)


def handle_errors(func: F) -> F:
    """Turn CommandError (and an interrupted run) into one line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CommandError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(exc.code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="reconciler")
def main() -> None:
    """GitOps-managed dependencies between Airflow DAGs, reconciled through etcd.

    Pipeline files live in git under pipelines/; `validate`, `graph` and `diff` check and
    show them in CI; `sync` writes a commit's graph to etcd; `run` keeps Airflow in step.
    """
