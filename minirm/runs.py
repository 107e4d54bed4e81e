"""The output folder of a run, and the inputs a command must never write over.

A command that writes a run (`train`, `sft`, `reinforce`) keeps in its --out folder the
model, results.json, metrics.jsonl, config.json (its settings) and, while it is interrupted,
a checkpoint. `check_out` reads that folder before any work: an earlier run there, finished or
interrupted, is refused unless --resume continues it or --force replaces it, and --resume with
nothing to resume is refused too. On --resume, `check_resumed_settings` compares the settings
that shape the run with those of its config.json: continuing with another batch size or model
would mix two runs in one.

A command that writes one file or one model folder (`evaluate --json`, `score --out`, `expo`,
`released`) never writes over one of its own inputs (`check_not_input`, `check_out_folder`),
even with --force, and replaces a non-empty folder only with --force (as `minirm.convert`).

Every refusal is one line (a `UserError`) before anything is read, loaded or written.
"""

import json
import os
import re
import shlex
import shutil
from pathlib import Path

from minirm.errors import UserError


# What a run leaves in its --out folder: a finished run (results.json or model) or an
# interrupted one (checkpoint); metrics.jsonl and config.json go with either.
FINISHED, INTERRUPTED = ("results.json", "model"), ("checkpoint",)
RUN_FILES = (*FINISHED, *INTERRUPTED, "metrics.jsonl", "config.json")
# The folders of a recipe's stages (minirm.recipes): 1-helpfulness, 2-scaled-bt, 3-expo, and
# paper-table's seed0, seed1, ... with a folder per row inside. No other folder in --out is
# taken for part of the run: --force never deletes it.
STAGE = re.compile(r"\d+-[a-z][\w-]*|seed\d+")


def stage_folders(out: Path, depth=0) -> list[Path]:
    """A recipe's stage folders in `out`, up to `depth` levels down (inside a seedN folder,
    every folder is a stage)."""
    if depth < 1 or not out.is_dir():
        return []
    found = []
    for p in sorted(out.iterdir()):
        if p.is_dir() and not p.is_symlink() and STAGE.fullmatch(p.name):
            found.append(p)
            if depth > 1 and p.name.startswith("seed"):
                found += [q for q in sorted(p.iterdir()) if q.is_dir() and not q.is_symlink()]
    return found


def held_run(out: Path, depth=0):
    """(kind, path) of the earlier run `out` holds, 'finished' or 'interrupted', or None.

    depth > 0 also looks in a recipe's stage folders (`stage_folders`): a stage that holds
    anything of a run makes the whole run an interrupted one, unless `out` itself holds the
    finished run's results."""
    if not out.is_dir():
        return None
    for name in FINISHED:
        if (out / name).exists():
            return "finished", out / name
    for folder in [out, *stage_folders(out, depth)]:
        for name in (*INTERRUPTED, *(FINISHED if folder != out else ())):
            if (folder / name).exists():
                return "interrupted", folder / name
    return None


def resume_hint(out) -> str:
    """The flags that continue the run in `out` (the folder given as --out)."""
    return f"--out {shlex.quote(str(out))} --resume"


def check_out(given, out: Path, resume: bool, force: bool, depth=0, inputs=(),
              resume_finished=False):
    """Refuse, before any work, an output folder this run cannot use (one line each):
    a file, a folder that cannot be created, an earlier run there without --resume or
    --force, --resume with nothing to resume. With --force, what an earlier run left is
    deleted here (on rank 0), unless it holds one of `inputs` or the working directory.

    `given`: the --out flag's value (None: the default folder `out` was chosen);
    `resume_finished`: whether --resume of a finished run is fine (it is then kept)."""
    if resume and force:
        raise UserError("give either --resume (continue the run in --out) or --force "
                        "(replace it), not both")
    if resume and given is None:
        raise UserError("--resume needs --out RUN, the folder of the interrupted run to "
                        "continue (without --out a new folder is made)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another --out")
    for x in inputs:  # the run writes config.json, model/, ... into --out
        if x is not None and Path(x).exists() and Path(x).resolve() == out.resolve():
            raise UserError(f"--out {out} is the input {x}, which the run would write over; "
                            "choose another --out")
    probe = Path(os.path.abspath(out))  # `a/../b` names b: make and remove that
    parent = probe
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not out.exists():  # can it be made? (made and removed again: nothing is left behind)
        made = [p for p in (probe, *probe.parents) if not p.exists()]
        try:
            probe.mkdir(parents=True, exist_ok=True)
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:
                for p in made:
                    p.rmdir()
        except OSError as e:
            raise UserError(f"--out {out}: cannot create it ({e.strerror or e}); choose "
                            "another --out") from None
    elif not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there (permission denied); choose "
                        "another --out")
    run = held_run(out, depth)
    if resume:
        if run is None or (run[0] == "finished" and not resume_finished
                           and not (out / "checkpoint").exists()):
            what = " (it holds a finished run)" if run else ""
            raise UserError(f"--resume: no checkpoint in {out}{what}; give --out the folder "
                            "of an interrupted run, or drop --resume to start a new run")
        return
    if run is None:
        return
    kind, path = run
    if not force:
        if kind == "finished":
            raise UserError(f"--out {out} already holds a finished run ({path}); choose "
                            "another --out or pass --force to replace it")
        raise UserError(f"--out {out} holds an interrupted run ({path}); continue it with "
                        f"{resume_hint(out)}, or choose another --out or pass --force to "
                        "replace it")
    stages = stage_folders(out, depth)
    doomed = [p for p in sorted(out.iterdir()) if p.name in RUN_FILES
              or (p in stages and any(held_run(q) for q in stages if q == p or p in q.parents))]
    guarded = {f"the input {x}": Path(x).resolve() for x in inputs
               if x is not None and Path(x).exists()}
    guarded["the current directory"] = Path.cwd().resolve()
    for what, inside in guarded.items():
        for p in doomed:
            if inside == p.resolve() or p.resolve() in inside.parents:
                raise UserError(f"refusing to replace {out}: {p} holds {what}; choose another "
                                "--out")
    if os.environ.get("RANK", "0") == "0":
        for p in doomed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def check_resumed_settings(out: Path, now: dict, ignore=(), resolved=(),
                           paths=("data", "val", "init_from", "model", "policy",
                                  "reward_model", "prompts")):
    """On --resume: the settings that shape the run must be those OUT/config.json was saved
    with; any other is one line naming each differing flag and both values, before anything
    is written. `resolved`: {setting: resolved value}, compared with the config's "resolved"
    section where it has one, so a default given explicitly is the same setting. `paths`:
    settings that name files, compared as absolute paths (`--out run` and `--out ./run` give
    a recipe's second stage the same --init-from). Settings in `ignore` (how often to save,
    the device, ...) may differ."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable settings of the run to resume ({e}); resume "
                        "another run, or start a new run in another --out") from None
    now = json.loads(json.dumps({**now, **dict(resolved)}, default=str))
    run_resolved = saved.get("resolved") if isinstance(saved.get("resolved"), dict) else {}
    for k in dict(resolved):
        if k in run_resolved:
            saved[k] = run_resolved[k]
    for k, v in now.items():  # a default given explicitly now: the run's resolved value
        if saved.get(k) is None and v is not None and k in run_resolved:
            saved[k] = run_resolved[k]
    # Paths the run derived inside its own --out (a recipe's --init-from) are saved as given
    # then: read them under the --out given now, which may be spelt another way.
    before, here = saved.get("out"), now.get("out")
    for k in paths:
        if not (isinstance(now.get(k), str) and isinstance(saved.get(k), str)):
            continue
        theirs = saved[k]
        if isinstance(before, str) and isinstance(here, str) and \
                Path(theirs).parts[:len(Path(before).parts)] == Path(before).parts:
            theirs = str(Path(here, *Path(theirs).parts[len(Path(before).parts):]))
        if os.path.abspath(now[k]) == os.path.abspath(theirs):
            now[k] = saved[k]

    def show(v):
        return "unset" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    diff = [f"--{k.replace('_', '-')} {show(v)} (the run has {show(saved[k])})"
            for k, v in now.items() if k not in ignore and k in saved and saved[k] != v]
    if diff:
        raise UserError(f"--resume: settings differ from the run in {out}: {', '.join(diff)}; "
                        "resume with the run's settings (its config.json), or start a new "
                        "run in another --out")


def _same_file(a, b) -> bool:
    """Whether paths `a` and `b` name one file, through symbolic and hard links."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def check_not_input(path, flag, inputs: dict):
    """Refuse an output file that is one of the command's input files (`inputs`: flag -> path):
    the results would overwrite what the command reads. Checked before any work."""
    for what, given in inputs.items():
        if path is not None and given is not None and _same_file(path, given):
            raise UserError(f"{flag} {path} is the {what} file: the results would overwrite "
                            f"it; choose another {flag} path")


def check_out_folder(out, inputs: dict, force=False, flag="--out"):
    """Refuse, before any work, an output folder that is a file, that is or holds one of the
    command's inputs (`inputs`: flag -> path; replaced, they would be lost), or that is not
    empty, unless `force` (as `minirm.convert` does)."""
    given, out = out, Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{given} exists and is not a folder; choose another {flag}")
    for what, path in inputs.items():
        if path is None or not Path(path).exists():  # a preset name, or reported when read
            continue
        inside = Path(path).resolve()
        if inside == out or out in inside.parents:
            held = "it is" if inside == out else "it holds"
            raise UserError(f"refusing to replace {given}: {held} {what} ({path}), which this "
                            f"command reads; choose another {flag}")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{given} is not empty; choose another {flag} or pass --force to "
                            "replace it")
        if not (out / "config.json").is_file():  # --force replaces a model, nothing else
            first = sorted(p.name for p in out.iterdir())[0]
            raise UserError(f"refusing to replace {given}: it is not a model folder (it holds "
                            f"{first}, and no config.json); choose another {flag}")
        cwd = Path.cwd()  # --force deletes the old folder: never the working directory
        if cwd == out or out in cwd.parents:
            raise UserError(f"refusing to replace {given}: it holds the current directory; "
                            f"choose another {flag}")
