"""The reading package's readable errors."""


class ReadingError(ValueError):
    """A request the service refuses, with a message for the person who made it."""
