"""One exception type for user mistakes.

The CLI prints a `UserError` as a one-line message and exits with status 2; anything
else is a bug and keeps its traceback. Messages name the file, row and field involved.
"""


class UserError(Exception):
    """A problem with the user's input, config or environment (not a bug in mmloom)."""
