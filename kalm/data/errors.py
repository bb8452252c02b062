"""The one exception type of `kalm.data`."""


class DataError(ValueError):
    """A dataset file is missing, corrupted or malformed; the message names the file and the fix."""
