"""Pieces every subcommand shares: the error boundary, logging and the consoles."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from renderqa.core.errors import RenderQAError

# Results go to stdout; logs, progress and errors go to stderr.
stdout_console = Console()
stderr_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")


def configure_logging(verbose: bool, quiet: bool) -> None:
    """Route `logging` through Rich on stderr at the level the flags select."""
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    handler = RichHandler(
        console=stderr_console,
        show_time=False,
        show_path=verbose,
        rich_tracebacks=False,
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("renderqa").setLevel(level)
    _quiet_model_libraries(verbose)


def _quiet_model_libraries(verbose: bool) -> None:
    """Silence the tqdm bars and info chatter of diffusers and transformers.

    renderqa draws its own progress; their bars would interleave with it on stderr.
    """
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity(logging.INFO if verbose else logging.ERROR)
    # huggingface_hub logs each download retry as a warning of its own.
    logging.getLogger("huggingface_hub").setLevel(
        logging.INFO if verbose else logging.ERROR
    )


def report_errors(function: Callable[P, R]) -> Callable[P, R]:
    """Turn a RenderQAError into one line on stderr and the error's exit code."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except RenderQAError as error:
            stderr_console.print(
                f"[bold red]error:[/] {escape(str(error))}",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            stderr_console.print("interrupted; finished outputs are kept")
            raise typer.Exit(130) from None

    return wrapper
