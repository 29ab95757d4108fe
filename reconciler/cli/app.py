"""The root command group and the one place where errors become exit codes.

Exit codes (DESIGN section 7): 0 ok, 1 a check failed or a change was refused, 2 usage or
environment error (etcd or Airflow unreachable, no such repository, an unreadable file).
A failure prints one clear line on stderr, never a traceback, and never a credential;
that holds for usage errors too (an unknown option, a bad value): click's four lines
(usage, hint, blank, error) become one, `error: reconciler CMD: ... (try 'reconciler CMD
--help')`.

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
from reconciler.core.settings import EtcdSettings

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


def nothing_synced(etcd: EtcdSettings) -> NoReturn:
    """The one answer of every command that needs a synced graph and finds none (status,
    plan, doctor, history, wait): one line, exit 1. Not 2: etcd answered and the
    settings work; what failed is the check that there is something to look at, as when
    a filter matches nothing. The line names where it looked, since a wrong namespace or
    endpoint is the usual cause."""
    fail(f"nothing synced yet in namespace {etcd.namespace} ({etcd.root}) at "
         f"{','.join(etcd.endpoints)}: run `reconciler sync`", EXIT_FAILED)


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


def _usage_line(exc: click.UsageError) -> CommandError:
    path = exc.ctx.command_path if exc.ctx is not None else "reconciler"
    return CommandError(f"{path}: {exc.format_message()} (try '{path} --help')",
                        EXIT_ENVIRONMENT)


class OneLineUsageGroup(click.Group):
    """A group whose usage errors, its own and its commands', are one line (exit 2).

    Parsing the group's arguments happens in make_context, a command's (and its option
    callbacks, and the command body) inside the group's invoke: both are covered. Calling
    `reconciler` alone still prints the help (click's NoArgsIsHelpError).
    """

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_line(exc) from None


@click.group(cls=OneLineUsageGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                               "auto_envvar_prefix": ENVVAR_PREFIX})
@click.version_option(__version__, prog_name="reconciler")
def main() -> None:
    """GitOps-managed dependencies between Airflow DAGs, reconciled through etcd.

    Pipeline files live in git under pipelines/; `validate`, `graph` and `diff` check and
    show them in CI; `sync` writes a commit's graph to etcd; `run` keeps Airflow in step.
    Every option can also be set by an environment variable (shown in each --help).
    """
