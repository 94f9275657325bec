"""The one exception type for mistakes a user can fix (exit code 2, no traceback)."""


class UserError(Exception):
    """A problem with the user's input: config, data file, missing artifact, model path.

    The message is shown as is, so it names the file, field or line and says what would fix it.
    """
