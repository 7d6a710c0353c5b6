"""The error a user's mistake raises: one line that says what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input or configuration. The CLI prints the message on one line and exits with status 2."""

    exit_code = 2
