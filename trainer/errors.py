"""Which errors are the user's (bad arguments or data), and how the run scripts report them.

The Python API raises them as usual. A run script started from the command line ends on one with
`<script>: error: <message>` on stderr and exit code 2, as argparse does; `CFMOE_TRACEBACK=1` shows the traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cfmoe.modeling_cfmoe.preprocessing import BadExampleError

TRACEBACK_VARIABLE = "CFMOE_TRACEBACK"


class UserInputError(Exception):
    """An argument or data error: its message says what to fix. Subclasses keep the built-in type raised."""


class UserValueError(UserInputError, ValueError):
    """A value the run cannot use: an argument out of range, a malformed data file or item."""


class UserTypeError(UserInputError, TypeError):
    """A data file of the wrong shape (e.g. not a JSON list)."""


class UserFileNotFoundError(UserInputError, FileNotFoundError):
    """A data folder, file or checkpoint that is not where the arguments say."""


# what counts as the user's: our argument and data errors, and the collator's bad items
USER_ERRORS = (UserInputError, BadExampleError)


@contextmanager
def user_input() -> Iterator[None]:
    """Re-raises the `ValueError`, `TypeError` and `FileNotFoundError` of the block (parsing arguments, loading
    data) as [`UserInputError`]s of the same type and message."""
    try:
        yield
    except UserInputError:
        raise
    except FileNotFoundError as error:
        raise UserFileNotFoundError(str(error)) from error
    except TypeError as error:
        raise UserTypeError(str(error)) from error
    except ValueError as error:
        raise UserValueError(str(error)) from error


def require(ok: bool, flag: str, rule: str, value: Any) -> None:
    """Raises `ValueError("--<flag> must be <rule>, got <value>")` unless `ok`: an argument check at parse time."""
    if not ok:
        raise ValueError(f"--{flag} must be {rule}, got {value!r}")


def name_flags(message: str, names: Iterable[str]) -> str:
    """`message` with each of the argument `names` written as its flag (`rho_train` -> `--rho_train`)."""
    names = sorted(names, key=len, reverse=True)
    return re.sub(rf"\b({'|'.join(names)})\b", r"--\1", message) if names else message


def one_line(error: BaseException) -> str:
    """The error's message on one line; for one re-raised from a DataLoader worker, the worker's own message."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):  # torch's ExceptionWrapper: the traceback ends with it
        return lines[-1].partition(": ")[2]
    return " ".join(" ".join(lines).split())


def exit_on_user_error(main: Callable[[], Any]) -> None:
    """Runs a script's `main()`; a user error (`USER_ERRORS`) ends the script with its message and exit code 2
    instead of a traceback, unless the environment sets `CFMOE_TRACEBACK=1`."""
    try:
        main()
    except USER_ERRORS as error:
        if os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            raise
        for bar in list(tqdm._instances):  # the Trainer's progress bars, closed now rather than after the message
            bar.close()
        print(f"{Path(sys.argv[0]).name}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
