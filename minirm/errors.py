"""One error style for every entry point.

A `UserError` is a mistake the user can fix (a bad flag, a missing or malformed file, a config
that does not match the weights). Entry points wrap their `main` with `cli`, which prints such an
error as one line on stderr and exits with status 2. Anything else is a bug in minirm and keeps
its traceback. Under torchrun every rank exits with status 2 but only rank 0 prints, so a check
that fails on all ranks reads as one line, not N.
"""

import os
import sys
from functools import wraps


class UserError(Exception):
    """What is wrong, where, and what to do about it, in one line."""


def cli(main):
    """Decorate a command's `main(argv=None)`: UserError -> one line on stderr, exit status 2."""

    @wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
