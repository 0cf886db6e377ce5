"""The library's readable errors."""


class LibraryError(ValueError):
    """A readable message about the library: an unknown document, a memory from another model..."""
