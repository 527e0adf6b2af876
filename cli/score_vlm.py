"""The `score-vlm` subcommand (declared; not implemented yet)."""

from renderqa.cli.common import report_errors
from renderqa.core.errors import NotBuiltError


@report_errors
def command() -> None:
    """Not implemented yet: exits with code 3."""
    raise NotBuiltError("'renderqa score-vlm' is not implemented yet in this version")
