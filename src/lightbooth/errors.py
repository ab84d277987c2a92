"""User-facing errors.

Anything a user can cause (bad flags, missing files, corrupt weights) is raised as `LightboothError` with a
one-line message that names the problem and the fix. The CLI prints it without a traceback and exits 2.
"""


class LightboothError(Exception):
    """A problem with the user's input; the message is one line saying what is wrong and what to do."""

    exit_code = 2
