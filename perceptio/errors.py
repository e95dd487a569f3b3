"""Errors a user can fix, and how every command line reports them.

Library code raises :class:`PerceptioError` for bad input (a missing file, a malformed dataset, an
unknown option value). The console scripts turn it into one line on stderr and exit code 2, with no
traceback: the message must say what is wrong and with which path or id.
"""

from __future__ import annotations

import sys
from typing import Callable

import typer


class PerceptioError(Exception):
    """Bad input that the user can fix; reported as one line, exit code 2."""


def run_cli(app: typer.Typer) -> Callable[[], None]:
    """Wrap a Typer app as a console-script entry point with the one-line error contract."""

    def main() -> None:
        try:
            app(standalone_mode=False)
        except PerceptioError as error:
            typer.secho(f"error: {error}", err=True, fg="red")
            sys.exit(2)
        except typer.Exit as done:
            sys.exit(done.exit_code)
        except typer.Abort:
            typer.secho("aborted", err=True, fg="red")
            sys.exit(130)
        except Exception as error:  # click's usage errors arrive here in non-standalone mode
            import click

            if isinstance(error, click.ClickException):
                error.show()
                sys.exit(2)
            raise

    return main
