"""Errors a user must fix (bad config, bad data): reported as one clear message with exit code 2."""


class UsageError(Exception):
    """Bad input: the message names the key, file or value; no traceback is shown."""
