"""The one exception type that means "bad input", and the guard that turns it into one line and exit 2."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

# OS errors that are the user's situation (disk full, no permission, missing path), not our bug
_USER_OS_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EDQUOT, errno.EISDIR,
                   errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG)


class InnardsError(Exception):
    """A user-facing error: bad input, missing file, incompatible artifact."""


class ChecksumError(InnardsError):
    """A shard or checkpoint whose bytes do not match the recorded checksum."""


def _quiet_stdout() -> None:
    # output piped into e.g. `head`: point stdout at /dev/null so the interpreter's final flush is silent
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def guarded(fn: Callable[[], object]) -> int:
    """Run ``fn``; bad input becomes one line on stderr and exit status 2, Ctrl-C exit 130."""
    try:
        rc = fn()
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except InnardsError as e:
        print(f"innards: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in _USER_OS_ERRORS:
            where = f": {e.filename}" if e.filename else ""
            print(f"innards: error: {e.strerror or e}{where}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("innards: interrupted", file=sys.stderr)
        return 130
    return rc if isinstance(rc, int) else 0
