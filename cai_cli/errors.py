"""The one exception type for mistakes a user can fix (exit code 2, no traceback), and the
scrubbing of secrets from everything printed."""

import errno
import os
import re
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


def reason(exc: BaseException) -> str:
    """What went wrong, for a message: the first line of ``exc``, else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Secrets never printed

# Variables that hold secrets whatever the config says; the config adds the ones its
# ``api_key_env`` keys name (``watch_secret_variables``).
_SECRET_VARIABLES = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
SHORTEST_SECRET = 6  # a shorter value would blank ordinary words; no real key is this short
# A bearer credential a server or proxy echoes, whole or cut short, whatever its variable.
_BEARER = re.compile(r"(\bBearer\s+)[^\s'\",;)}\]]+", re.IGNORECASE)
HIDDEN = "***"


def watch_secret_variables(names) -> None:
    """Also scrub the values of these environment variables (a config's ``api_key_env``)."""
    _SECRET_VARIABLES.update(name for name in names if isinstance(name, str) and name)


def scrub(text: str) -> str:
    """``text`` with the value of every secret variable (``HF_TOKEN``, each ``api_key_env``)
    and every bearer credential replaced by ``***``: for every message, warning and log line
    before it is printed, wherever its text came from (a server's echo, an exception)."""
    values = {os.environ.get(name, "").strip() for name in _SECRET_VARIABLES}
    for value in sorted((v for v in values if len(v) >= SHORTEST_SECRET), key=len, reverse=True):
        text = text.replace(value, HIDDEN)
    return _BEARER.sub(lambda m: m.group(1) + HIDDEN, text)
