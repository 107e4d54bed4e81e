"""minirm's C++ kernels, built on first use with the machine's own compiler and loaded with
ctypes: the streamed decoding product (`minirm/streamed.cpp`), the whole decoding step for the
CPU (`minirm/decode.cpp`), the element-wise parts of a block for the CPU (`minirm/fused.cpp`)
and causal attention for the CPU (`minirm/attention.cpp`).

Each source is compiled with $CXX (else `c++`) and -O3 -march=native -fopenmp, about a second
once per machine, into a cache folder: $MINIRM_CACHE, else ~/.cache/minirm, or a folder of the
user's own in the temporary directory where that one is read-only. The library's name carries a
hash of the source and the shared headers (`vec.h`, `streamed.h`, `fused.h`), the flags, the
compiler's version and the processor's features, so an edited source, another compiler or a
cache folder shared by unlike machines never loads a stale build. A library links the OpenMP
runtime that torch has loaded, so its loops run on torch's threads (`torch.set_num_threads`).

Where a source cannot be built (no compiler, no OpenMP) its `Library.available()` is False, the
reason is in `why_unavailable()`, and minirm runs the same computation with torch's own
operators.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def cache_dir() -> Path:
    if os.environ.get("MINIRM_CACHE"):
        return Path(os.environ["MINIRM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minirm"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _private_temp() -> Path:
    """A folder of this user's own in the temporary directory: a library loaded from a folder
    that others can write to could be anyone's code."""
    user = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"minirm-{user}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if hasattr(os, "getuid") and (info.st_uid != user or info.st_mode & 0o022):
        raise RuntimeError(f"{folder} belongs to another user or others can write to it; "
                           "set MINIRM_CACHE to a folder of your own")
    return folder


def machine() -> str:
    """The processor's feature flags: -march=native compiles for them, so a cache folder shared
    between machines keeps one library per kind of processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.machine() + platform.processor()


def build(source: Path, flags=None) -> ctypes.CDLL:
    """Compile `source` into a shared library (or find it in the cache) and load it; raises
    RuntimeError with the compiler's last line when that fails."""
    flags = FLAGS if flags is None else flags
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # vec.h, ...
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, " ".join(flags).encode(),
                                     version.encode(), machine().encode()])).hexdigest()[:16]
    name = f"{source.stem}-{key}.so"
    folder = cache_dir()
    if not (folder / name).exists() and not _writable(folder):
        folder = _private_temp()  # a read-only home
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: processes starting together (torchrun's
        # ranks) never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, str(source), "-o", tmp],
                                  capture_output=True, text=True)
            if done.returncode:
                lines = done.stderr.strip().splitlines() or ["?"]
                said = next((line for line in lines if "error" in line), lines[-1])
                raise RuntimeError(f"{compiler} failed on {source.name}: {said}")
            # mkstemp made the file for this user alone; a shared cache folder serves others
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o755 & ~umask)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return ctypes.CDLL(str(path))


class Library:
    """A source file's library, built on the first `available()` (or `get()`); `functions` maps
    each exported C function to its argument types, set on the loaded library, and `returns`
    names the functions that return an int (the others return nothing)."""

    def __init__(self, source: str, functions: dict, returns: tuple = ()):
        self.source = Path(__file__).with_name(source)
        self.functions, self.returns = functions, returns
        self.flags = FLAGS
        self.lib = None
        self.why = None

    def load(self) -> ctypes.CDLL:
        """Build and load now (whether or not an earlier try failed); raises RuntimeError."""
        lib = build(self.source, self.flags)
        for name, argtypes in self.functions.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int if name in self.returns else None
        return lib

    def available(self) -> bool:
        """Whether the library is built and loaded here (built on the first call)."""
        if self.lib is None and self.why is None:
            try:
                self.lib = self.load()
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                self.why = str(e)
        return self.lib is not None

    def why_unavailable(self) -> str | None:
        """Why the library could not be built here (the compiler's last line), or None."""
        return None if self.available() else self.why

    def reset(self):
        """Forget the loaded library or the failure, so that the next call builds again."""
        self.lib = self.why = None
