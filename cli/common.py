"""Pieces every subcommand shares: the error boundary, logging and the consoles."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from renderqa.core.errors import RenderQAError

# Results go to stdout; logs, progress and errors go to stderr.
stdout_console = Console()
stderr_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")


def configure_logging(verbose: bool, quiet: bool) -> None:
    """Route `logging` through Rich on stderr at the level the flags select."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(
        console=stderr_console,
        show_time=False,
        show_path=verbose,
        rich_tracebacks=False,
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("renderqa").setLevel(level)


def report_errors(function: Callable[P, R]) -> Callable[P, R]:
    """Turn a RenderQAError into one line on stderr and the error's exit code."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except RenderQAError as error:
            stderr_console.print(
                f"[bold red]error:[/] {error}", markup=True, highlight=False
            )
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            stderr_console.print("interrupted; finished outputs are kept")
            raise typer.Exit(130) from None

    return wrapper
