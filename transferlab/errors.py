"""The one exception type a user sees: its message is a complete, single-line explanation."""


class TransferlabError(Exception):
    """Bad input or an impossible request; the CLI prints it as one line and exits non-zero."""
