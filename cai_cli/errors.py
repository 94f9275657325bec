"""The one exception type for mistakes a user can fix (exit code 2, no traceback)."""

import errno
from pathlib import Path

# Operating-system errors that are the user's to fix (exit 2): a full disk or quota, a read-only
# file system, a file the user may not write.
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class UserError(Exception):
    """A problem with the user's input: config, data file, missing artifact, model path.

    The message is shown as is, so it names the file, field or line and says what would fix it.
    """


def relative_note(path: Path | str) -> str:
    """For a message about ``path``: what a relative path was read relative to (where cai runs,
    which need not be where the config file lives); empty for an absolute path."""
    return "" if Path(path).is_absolute() else f" (relative to the current directory, {Path.cwd()})"


def not_found(path: Path | str) -> str:
    return "not found" + relative_note(path)
