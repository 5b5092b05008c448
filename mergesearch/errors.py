"""The one error type users see: it names the file, tensor or key and says what to do."""


class MergeSearchError(Exception):
    """A problem with the user's input; the CLI prints it without a traceback and exits 2."""
