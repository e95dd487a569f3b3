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
    """Wrap a Typer app as a console-script entry point with the one-line error contract.

    Click (in standalone mode) already reports usage errors as one line with exit code 2; the
    wrapper does the same for :class:`PerceptioError` raised anywhere below a command.
    """

    def main() -> None:
        try:
            app()
        except PerceptioError as error:
            typer.secho(f"error: {error}", err=True, fg="red")
            sys.exit(2)

    return main
