"""The one exception type for mistakes a user can fix (exit code 2, no traceback)."""

import errno

# Operating-system errors that are the user's to fix (exit 2): a full disk or quota, a read-only
# file system, a file the user may not write.
USER_OS_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


class UserError(Exception):
    """A problem with the user's input: config, data file, missing artifact, model path.

    The message is shown as is, so it names the file, field or line and says what would fix it.
    """
