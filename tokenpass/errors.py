"""Errors tokenpass raises on purpose: one line each, naming the model, node, pass or argument at fault."""


class TokenpassError(Exception):
    """Base of every error meant to reach a user as one clear line (the CLI prints it without a traceback)."""


class CaptureError(TokenpassError):
    """The model could not be turned into a graph."""


class PassError(TokenpassError):
    """A pass failed or was used wrongly."""


class PassOrderError(PassError):
    """A pass list is in an order whose declared requirements do not hold."""
