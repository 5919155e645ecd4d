"""The one base class of every error the user can fix, and the guard every entry point runs under.

Each subclass (ConfigError, CheckpointError, DataError, CodeFileError, RunError, EvalError) carries a
message written for the user: what is wrong, which file or key, what to do. ``main_guard`` prints it as
one line ``error: ...`` and exits with status 2; Ctrl-C is one line ``interrupted: ...`` and status 130;
anything else escaping is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

from tqdm import tqdm


class UserError(ValueError):
    """Bad input, configuration, data, checkpoint or run directory; the message says which and why."""


def guarded(main: Callable[[], Any]) -> int:
    """Run ``main``; a user error (or an OS error a bad path or a full disk causes) becomes one line
    ``error: ...`` on stderr and the return value 2. Set TRACEBACK=1 to see the stack instead."""
    try:
        code = main()
    except KeyboardInterrupt as e:  # Ctrl-C: one line (the script's own, when it says what to do), status 130
        if os.environ.get("TRACEBACK"):
            raise
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"interrupted: {e}" if str(e) else "interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        if os.environ.get("TRACEBACK") or (isinstance(e, OSError) and not _path_error(e)):
            raise
        for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar left open must not share the line
            bar.close()
        print(f"error: {describe_os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def main_guard(main: Callable[[], Any]) -> None:
    """The guard of every entry point: exit with ``guarded(main)``'s status."""
    sys.exit(guarded(main))


# OS errors a wrong path or a full disk causes: the user can fix them, they are not bugs.
_USER_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EEXIST,
                errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def _path_error(e: OSError) -> bool:
    return isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                          PermissionError)) or e.errno in _USER_ERRNOS


def describe_os_error(e: OSError) -> str:
    """'<path>: <reason>' for an OSError, e.g. 'runs/x: Is a directory'."""
    what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return f"{e.filename}: {what}" if e.filename else what
