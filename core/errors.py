"""Exceptions raised by renderqa's core, and the exit code each one maps to.

RenderQAError                 base; the CLI prints its message on one line
├── InvalidInputError         an option or input value breaks a rule (exit 2)
├── ModelLoadError            a model id, folder or checkpoint cannot be loaded (exit 2)
├── ImageReadError            an image file is missing, truncated or not an image (exit 2)
├── OutputError               an output path cannot be written (exit 2)
├── DeviceError               the requested device or dtype is not available (exit 2)
├── RemoteError               a remote endpoint failed or rejected the request (exit 3)
└── NotBuiltError             the subcommand exists but is not implemented yet (exit 3)
"""


class RenderQAError(Exception):
    """Base of every error that the CLI reports as a one-line message."""

    exit_code = 2


class InvalidInputError(RenderQAError):
    """An option or input value breaks a rule; the message names the value and fix."""


class ModelLoadError(RenderQAError):
    """A model id, folder or checkpoint cannot be resolved or loaded."""


class ImageReadError(RenderQAError):
    """An image file is missing, unreadable, truncated or too large."""


class OutputError(RenderQAError):
    """An output file or folder cannot be created or written."""


class DeviceError(RenderQAError):
    """The requested device or dtype is not available on this machine."""


class RemoteError(RenderQAError):
    """A remote endpoint failed, timed out or rejected the request."""

    exit_code = 3


class NotBuiltError(RenderQAError):
    """The subcommand is declared but not implemented yet."""

    exit_code = 3
