"""The one exception a user is meant to see.

`UserError` says what is wrong and what to do about it, in one line. The CLI prints it to
stderr and exits 2. Every other exception is a bug in layerwise and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix: the message names the problem and the fix."""
