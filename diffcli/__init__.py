"""diffcli: score-based diffusion and flow-matching models from the command line."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("diffcli")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"


class DiffcliError(ValueError):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""


def short(value, limit: int = 80) -> str:
    """str(value) cut to `limit` characters: an error line never echoes a long value (one read from a file) whole."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
