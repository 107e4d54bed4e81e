"""One error style for every entry point.

A `UserError` is a mistake the user can fix (a bad flag, a missing or malformed file, a config
that does not match the weights). Entry points wrap their `main` with `cli`, which prints such an
error as one line on stderr and exits with status 2. Anything else is a bug in minirm and keeps
its traceback. Under torchrun every rank exits with status 2 but only rank 0 prints, so a check
that fails on all ranks reads as one line, not N.

Two kinds of failure come from outside minirm and are reported the same way: a bad flag seen by
argparse (`ArgumentParser`, which would otherwise print the whole usage first) and a disk that
is full, read-only or not ours to write (`ENVIRONMENT_ERRNOS`; `write_failure` recognises them
also when a library wraps them in its own exception type).
"""

import argparse
import errno
import os
import sys
import time
from functools import wraps

# Failed reads and writes that are never minirm's bug: the fix is on the machine, not the code.
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                      errno.EFBIG: "the file size limit is reached",
                      errno.EROFS: "the file system is read-only",
                      errno.EACCES: "permission denied"}


class UserError(Exception):
    """What is wrong, where, and what to do about it, in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, bad choice) are a one-line UserError."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def write_failure(e: BaseException) -> str | None:
    """Why a write failed when the machine is to blame (full disk, quota, read-only, I/O error),
    or None for anything else (a bug: it keeps its traceback).

    safetensors and torch.save report a short write in their own exception types, with the
    OS error only in the message ("I/O error: No space left on device (os error 28)",
    "file write failed", "unexpected pos"), so those are recognised by their text.
    """
    if isinstance(e, OSError):
        return ENVIRONMENT_ERRNOS.get(e.errno) or (
            f"{e.strerror or e}" if e.errno is not None else None)
    text = str(e)
    if type(e).__name__ == "SafetensorError" and ("I/O error" in text or "os error" in text):
        return text
    if isinstance(e, RuntimeError) and ("file write failed" in text or "unexpected pos" in text):
        return f"torch.save could not write ({text.splitlines()[0]})"
    return None


def cli(main):
    """Decorate a command's `main(argv=None)`: UserError -> one line on stderr, exit status 2."""

    @wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            _fail(str(e))
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            _fail(f"{e.filename or 'a file'}: {e.strerror} ({ENVIRONMENT_ERRNOS[e.errno]}); "
                  "free some space or choose another --out, then run again")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper


# Under torchrun, the first rank to exit makes torchrun stop the others: a rank other than 0
# that fails waits this long first, so that rank 0, failing on the same check, prints its line
# (seen in CI: rank 1 exited first, rank 0 was stopped before printing, and no line came out).
OTHER_RANKS_WAIT_S = 2.0


def _fail(message):
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr)
    else:
        sys.stderr.flush()
        time.sleep(OTHER_RANKS_WAIT_S)
    sys.exit(2)
