"""User-facing errors and the one error wrapper of every entry point.

Anything the user can fix (a missing path, an unknown name, a bad option, a
corrupt input file) is raised as :class:`UserError`. Every entry point
(``fusioner``, ``python -m pipeline.bench``, ``python -m pipeline.sweep``,
``python -m pipeline.sweep.worker``) runs through :func:`run_entry`, which
prints such an error on one line and exits with code 2; ``--verbose`` shows the
traceback. Command-line usage errors (an unknown option, a missing argument)
exit with code 2 too, whichever click (vendored by typer or not) or argparse
raised them.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable


class UserError(Exception):
    """An error caused by the user's input; reported in one line, exit code 2."""

    exit_code = 2


def setting(key: str) -> str:
    """A config key (``optim.epochs``) or keyword argument (``resume``) named in a message.

    Library messages name what the library was given; a command line that took it as a flag
    shows the flag instead (:func:`in_flags`), so neither user is told about options they never typed.
    """
    return f"`{key}`"


def in_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each :func:`setting` that ``flags`` maps shown as its flag, the others as plain keys."""
    import re

    return re.sub(r"`([\w.]+)`", lambda m: flags.get(m.group(1), m.group(1)), message)


def require(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)


USAGE_EXIT = 2
INTERRUPT_EXIT = 130


def _class_names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__}


def is_usage_error(err: BaseException) -> bool:
    """A click usage/parameter error, from any click: the real one or a copy vendored inside typer.

    Matched by class name and behaviour rather than by class identity, so a dependency that
    ships its own click can never turn a usage error back into a traceback.
    """
    return "ClickException" in _class_names(err) and callable(getattr(err, "show", None))


def _click_exit_code(err: BaseException) -> int | None:
    """The exit code click's (or typer's) ``Exit``/``Abort`` stands for; None for other exceptions."""
    module = type(err).__module__
    if "click" not in module and "typer" not in module:
        return None
    names = _class_names(err)
    if "Exit" in names:
        return int(getattr(err, "exit_code", 0) or 0)
    if "Abort" in names:
        return INTERRUPT_EXIT
    return None


def one_line(message: object) -> str:
    """``message`` on one line (a multi-line message keeps its first line and says how many more)."""
    lines = [line for line in str(message).splitlines() if line.strip()] or [type(message).__name__]
    return lines[0] + (f" (+{len(lines) - 1} more lines; --verbose shows them)" if len(lines) > 1 else "")


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
NOT_PERMITTED = {errno.EACCES, errno.EPERM, errno.EROFS}


def environment_error(err: BaseException) -> UserError | None:
    """A full disk, a file-size limit or a folder the user may not write to, anywhere in ``err``'s chain,
    as one line.

    Writes are atomic or resumable throughout (stores, checkpoints, sweep folders), so the advice is
    the same everywhere: fix the cause and run the same command again.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL | NOT_PERMITTED | {errno.EFBIG}:
            where = err.filename or "a file"
            if err.errno in DISK_FULL:
                return UserError(f"no space left on the device writing {where}; free some space and run the same "
                                 f"command again (it resumes where it stopped)")
            if err.errno == errno.EFBIG:
                return UserError(f"file too large writing {where} (the file-size limit of this shell, `ulimit -f`, "
                                 f"or of the file system); raise the limit and run the same command again (it "
                                 f"resumes where it stopped)")
            return UserError(f"permission denied: {where} ({err.strerror or 'not writable'}); make it writable or "
                             f"use another folder (`out`), then run the same command again")
        err = err.__cause__ or err.__context__
    return None


def _reader_left() -> int:
    """The reader of our output closed it (``| head -1``): it asked for no more, so nothing failed.

    stdout is pointed at /dev/null, so the interpreter's last flush does not fail again.
    """
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test's capture)
        pass
    return 0


def run_entry(command: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Run an entry point's ``command`` and turn how it ended into an exit code.

    - :class:`UserError`: ``error: <message>`` on one line of stderr, exit code 2;
    - a usage error (click of any vendoring, or argparse's ``SystemExit(2)``): the parser's
      usage block, exit code 2;
    - an int returned by ``command``: that exit code (anything else returned: 0);
    - ``SystemExit`` / click's ``Exit`` (``--help``, ``--version``, ``typer.Exit(n)``): its code;
    - Ctrl-C / click's ``Abort``: ``interrupted``, exit code 130;
    - a full disk or a permission denied (:func:`environment_error`): one line, exit code 2;
    - a reader that closed our output early (``| head -1``): exit code 0, no traceback.

    ``verbose`` prints the traceback first. Anything else is a bug and propagates.
    """
    try:
        result = command()
        sys.stdout.flush()  # a closed pipe shows here, not after the exit code is chosen
        return result if isinstance(result, int) else 0
    except BrokenPipeError:
        return _reader_left()
    except UserError as err:
        if verbose:
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPT_EXIT
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - classified below, re-raised when unknown
        if is_usage_error(err):
            if verbose:
                traceback.print_exc()
            err.show()  # type: ignore[attr-defined]
            return int(getattr(err, "exit_code", USAGE_EXIT))
        code = _click_exit_code(err)
        environment = environment_error(err) if code is None else None
        if environment is not None:
            if verbose:
                traceback.print_exc()
            print(f"error: {one_line(environment)}", file=sys.stderr)
            return environment.exit_code
        if code is None:
            raise
        if code == INTERRUPT_EXIT:
            print("aborted", file=sys.stderr)
        return code
