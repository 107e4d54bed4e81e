"""A run's output folder (minirm/runs.py): what --force may delete, what --resume compares, and
the inputs no command writes over. The commands' own tests (test_train, test_sft,
test_reinforce, test_reliability) run them end to end; these pin the rules on folders made
by hand."""

import json
from pathlib import Path

import pytest

from conftest import snapshot

from minirm.errors import UserError
from minirm.runs import (check_out, check_out_folder, check_resumed_settings, held_run,
                         stage_folders)


def touch(path: Path, text="x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_force_deletes_only_the_run_and_its_stages(tmp_path):
    out = tmp_path / "runs"
    for f in ("config.json", "metrics.jsonl", "results.json", "model/model.safetensors",
              "1-helpfulness/checkpoint/state", "2-scaled-bt/model/config.json",
              "seed0/bt/model/config.json"):
        touch(out / f)
    kept = {f: touch(out / f) for f in ("run-a/model/config.json", "run-a/results.json",
                                        "run-b/1-helpfulness/checkpoint/state",
                                        "data/preference/preference.jsonl", "notes.txt")}
    assert [p.name for p in stage_folders(out, 2)] == ["1-helpfulness", "2-scaled-bt", "seed0",
                                                      "bt"]
    with pytest.raises(UserError, match="already holds a finished run"):
        check_out(str(out), out, resume=False, force=False, depth=2)
    check_out(str(out), out, resume=False, force=True, depth=2)
    assert sorted(p.name for p in out.iterdir()) == ["data", "notes.txt", "run-a", "run-b"]
    assert all(p.exists() for p in kept.values())


def test_folders_of_other_runs_are_not_a_run(tmp_path):
    """A folder holding whole runs (`--out runs`, `--out .`) is not itself an interrupted run:
    nothing is refused, and nothing would be deleted."""
    out = tmp_path / "runs"
    touch(out / "run-a" / "results.json")
    touch(out / "run-b" / "1-helpfulness" / "checkpoint" / "state")
    assert held_run(out, depth=2) is None
    before = snapshot(out)
    check_out(str(out), out, resume=False, force=True, depth=2)
    assert snapshot(out) == before


def test_out_that_is_an_input_is_refused(tmp_path):
    model = touch(tmp_path / "rm" / "config.json", '{"hidden_size": 8}').parent
    before = snapshot(model)
    for force in (False, True):
        with pytest.raises(UserError, match="is the input .*rm, which the run would write"):
            check_out(str(model), model, resume=False, force=force, inputs=(str(model),))
    assert snapshot(model) == before


def test_force_replaces_a_model_folder_only(tmp_path):
    mine = tmp_path / "userdata"
    touch(mine / "notes.txt")
    touch(mine / "sub" / "y")
    before = snapshot(mine)
    with pytest.raises(UserError, match="not a model folder .*notes.txt"):
        check_out_folder(str(mine), {}, force=True)
    assert snapshot(mine) == before
    model = touch(tmp_path / "export" / "config.json").parent
    check_out_folder(str(model), {}, force=True)  # a model folder: replaced by the command


def test_resume_compares_resolved_defaults_and_paths_inside_the_run(tmp_path, monkeypatch):
    run = tmp_path / "R0"
    monkeypatch.chdir(tmp_path)
    saved = {"out": "R0", "init_from": "R0/1-helpfulness/model", "data": "d.jsonl",
             "max_length": None, "batch_size": 8, "resolved": {"max_length": 256}}
    touch(run / "config.json", json.dumps(saved))
    same = {"out": str(run), "init_from": str(run / "1-helpfulness" / "model"),
            "data": str(tmp_path / "d.jsonl"), "max_length": 256, "batch_size": 8}
    check_resumed_settings(run, same, ignore=("out",), paths=("data", "init_from"))
    monkeypatch.chdir(run)  # the run's own paths still read under --out given from elsewhere
    check_resumed_settings(run, {**same, "out": ".", "data": "d.jsonl"}, ignore=("out",),
                           paths=("data", "init_from"))
    with pytest.raises(UserError, match=r"--max-length 512 \(the run has 256\), "
                                        r"--batch-size 64 \(the run has 8\)"):
        check_resumed_settings(run, {**same, "max_length": 512, "batch_size": 64},
                               ignore=("out",), paths=("data", "init_from"))
