"""Errors a user can act on: the message is the whole story, no stack trace needed."""


class EngineError(ValueError):
    """Bad input or setting for the engine: an empty text, a wrong model path, an impossible config."""
