"""Nothing a user owns is lost, and nothing in a checkpoint runs: output folders, resume and checkpoint files."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import demo
import eval_dialogue
import train_dialogue
import train_pretrain
import vikdf.evaluation.dialogues
from pretrain_helpers import pretrain_argv
from vikdf.atomic import is_complete_checkpoint
from vikdf.data.pairs import PairRecord
from vikdf.output_folder import folder_lock
from vikdf.data.stream_state import load_stream_state, save_stream_state
from vikdf.training.trainers import resolve_resume_checkpoint, stream_state_name

# 4 steps, checkpoints at steps 2 and 4; the save at step 4 first meets a full disk.
MAX_STEPS, SAVE_STEPS = 4, 2


class ModelLoaded(Exception):
    """Raised where a model would load: a check that must come first did not."""


def _refuse_model_load(*args, **kwargs):
    raise ModelLoaded


class _RunsCode:
    """Unpickling this runs `open(path, "w")`: the file appearing is the code having run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _argv(tiny_components, pair_world, output_dir, **options) -> list[str]:
    return pretrain_argv(
        tiny_components("llama"), "wds:" + pair_world.train_shards, output_dir,
        max_steps=MAX_STEPS, save_steps=SAVE_STEPS, logging_steps=1, learning_rate=1e-3, **options,
    )


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_components, pair_world, tmp_path_factory):
    """A pre-training run whose save at step 4 meets a full disk, then resumed with `last` to its end."""
    output_dir = tmp_path_factory.mktemp("no_data_loss") / "run"
    argv = _argv(tiny_components, pair_world, output_dir)
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *args, **kwargs):
        if f"checkpoint-{MAX_STEPS}" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", disk_full_at_step_4)
        with pytest.raises(OSError) as full:
            train_pretrain.main(argv)
    after_full_disk = sorted(p.name for p in output_dir.iterdir())
    checkpoint_2 = _folder_bytes(output_dir / "checkpoint-2")
    resumed = train_pretrain.main(argv + ["--resume_from_checkpoint", "last"])
    return {"argv": argv, "output_dir": output_dir, "full": full.value, "after_full_disk": after_full_disk,
            "checkpoint_2": checkpoint_2, "resumed": resumed}


def test_a_full_disk_during_a_save_is_reported_and_earlier_checkpoints_stay_as_they_were(run):
    message = str(run["full"])
    assert run["full"].errno == errno.ENOSPC
    assert "No space left on device while saving checkpoint-4" in message and "--resume_from_checkpoint last" in message
    # The partial save was removed; checkpoint-2 is whole, and the resumed run did not change it.
    assert [name for name in run["after_full_disk"] if name.startswith("checkpoint-") or name.startswith("_saving")] \
        == ["checkpoint-2"]
    assert is_complete_checkpoint(run["output_dir"] / "checkpoint-2")
    assert _folder_bytes(run["output_dir"] / "checkpoint-2") == run["checkpoint_2"]


def test_the_logged_epoch_goes_on_from_the_checkpoint_after_a_resume(run):
    trainer = run["resumed"]
    epochs = {entry["step"]: entry["epoch"] for entry in trainer.state.log_history if "loss" in entry}
    # Resumed from checkpoint-2 of a 4-step stream: steps 3 and 4 are 3/4 and 4/4 of the run, not 1/4 and 2/4.
    assert epochs == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_resuming_a_finished_run_says_already_at_max_steps_and_changes_nothing(run, caplog):
    output_dir = run["output_dir"]
    before = _folder_bytes(output_dir)
    with caplog.at_level("WARNING"):
        trainer = train_pretrain.main(run["argv"] + ["--resume_from_checkpoint", "last"])
    assert "already at max_steps (4)" in caplog.text
    assert trainer.state.global_step == MAX_STEPS and trainer.finished_before_start
    assert _folder_bytes(output_dir) == before  # no checkpoint-5, no new final weights


def test_a_changed_dataloader_worker_count_is_refused_before_the_model_loads(run, monkeypatch):
    monkeypatch.setattr(train_pretrain, "build_model", _refuse_model_load)
    checkpoint = run["output_dir"] / "checkpoint-2"
    for workers in (1, 2):
        argv = run["argv"] + ["--resume_from_checkpoint", str(checkpoint), "--dataloader_num_workers", str(workers)]
        expected = rf"1 process\(es\) × 0 DataLoader worker\(s\); this run has 1 process\(es\) × {workers} DataLoader"
        with pytest.raises(ValueError, match=expected):
            train_pretrain.main(argv)


def test_resume_refuses_pickled_stream_state_without_unpickling_it(run, tmp_path, monkeypatch):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(run["output_dir"] / "checkpoint-2", checkpoint, ignore=shutil.ignore_patterns(stream_state_name(0)))
    ran = tmp_path / "code_ran"
    torch.save(_RunsCode(ran), checkpoint / "pair_stream_0.pt")  # what an earlier version (or an attacker) left
    monkeypatch.setattr(train_pretrain, "build_model", _refuse_model_load)
    with pytest.raises(ValueError, match="pair_stream_0.pt holds the pair stream's position as a pickle"):
        train_pretrain.main(run["argv"] + ["--resume_from_checkpoint", str(checkpoint)])
    assert not ran.exists()


def test_stream_state_is_stored_as_safetensors_and_read_back_equal(tmp_path):
    state = {"_snapshot": {"worker_0": {"cursors": [(0, 512, 3)], "rng": {"state": 2**100}}},
             "buffer": [PairRecord(b"\x89PNG\x00", "a red zorp", "train", "00000.tar", "k1")],
             "counts": {1: "a non-string key"}, "empty": b""}
    path = tmp_path / stream_state_name(0)
    save_stream_state(state, path)
    assert path.suffix == ".safetensors"
    assert load_stream_state(path) == state


def test_last_passes_over_a_checkpoint_with_damaged_weights(tmp_path, caplog):
    for step in (2, 4):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        save_file({"weight": torch.ones(64)}, folder / "model.safetensors")
    damaged = tmp_path / "checkpoint-4" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # cut short, as a full disk or a failed copy leaves it
    with caplog.at_level("WARNING"):
        assert resolve_resume_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert str(damaged) in caplog.text
    with pytest.raises(ValueError, match="checkpoint-4' is damaged: .*model.safetensors"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))


def test_a_second_pretraining_run_into_a_locked_output_dir_is_refused_naming_the_holder(
    tiny_components, pair_world, tmp_path, monkeypatch
):
    monkeypatch.setattr(train_pretrain, "build_model", _refuse_model_load)
    output_dir = tmp_path / "shared"
    with folder_lock(output_dir):  # another run writing there (flock: a second open file is another holder)
        with pytest.raises(RuntimeError, match=rf"being written by another run \(process {os.getpid()};"):
            train_pretrain.main(_argv(tiny_components, pair_world, output_dir))


@pytest.mark.parametrize("earlier", ["checkpoint-30", "model.safetensors"])
def test_a_fresh_run_into_a_folder_holding_an_earlier_run_is_refused_and_changes_nothing(
    tiny_components, pair_world, tmp_path, monkeypatch, earlier
):
    monkeypatch.setattr(train_pretrain, "build_model", _refuse_model_load)
    output_dir = tmp_path / "seed0"
    output_dir.mkdir()
    (output_dir / earlier).write_text("the first run's")
    before = _folder_bytes(output_dir)
    for resume in ([], ["--resume_from_checkpoint", "last"]):  # `last` finds no checkpoint to continue here
        if earlier.startswith("checkpoint-") and resume:
            continue  # an incomplete checkpoint folder is passed over by `last`; tested above
        with pytest.raises(FileExistsError, match=rf"holds an earlier run \({earlier}\).*--resume_from_checkpoint last"):
            train_pretrain.main(_argv(tiny_components, pair_world, output_dir) + resume)
    after = _folder_bytes(output_dir)
    after.pop("_output.lock")  # the refused run's own lock, released
    assert after == before


@pytest.fixture
def dialogue_world(save_tiny_vikdf, tmp_path):
    checkpoint = save_tiny_vikdf(tmp_path / "pretrained")
    test_file = tmp_path / "dialogues.json"
    test_file.write_text(json.dumps([{"context": ["a red zorp"], "response": "it is red."}] * 2))
    return checkpoint, test_file


def test_dialogue_output_dir_equal_to_the_starting_checkpoint_is_refused(dialogue_world, monkeypatch):
    checkpoint, train_file = dialogue_world
    before = _folder_bytes(checkpoint)
    monkeypatch.setattr(vikdf.evaluation.dialogues, "load_checkpoint", _refuse_model_load)
    with pytest.raises(ValueError, match="would overwrite the checkpoint this run starts from"):
        train_dialogue.main(["--model_name_or_path", str(checkpoint), "--train_file", str(train_file),
                             "--output_dir", str(checkpoint), "--report_to", "none", "--use_cpu", "true"])
    assert _folder_bytes(checkpoint) == before


def test_eval_output_dir_that_is_a_file_or_locked_is_refused_before_the_model_loads(
    dialogue_world, tmp_path, monkeypatch
):
    checkpoint, test_file = dialogue_world
    monkeypatch.setattr(vikdf.evaluation.dialogues, "load_checkpoint", _refuse_model_load)
    argv = ["--model_name_or_path", str(checkpoint), "--test_file", str(test_file), "--device", "cpu"]
    existing = tmp_path / "results.txt"
    existing.write_text("mine")
    with pytest.raises(NotADirectoryError, match="results.txt' is an existing file"):
        eval_dialogue.main([*argv, "--output_dir", str(existing)])
    assert existing.read_text() == "mine"
    with folder_lock(tmp_path / "eval"):
        with pytest.raises(RuntimeError, match="being written by another run"):
            eval_dialogue.main([*argv, "--output_dir", str(tmp_path / "eval")])


def test_demo_refuses_a_folder_of_user_files_and_replaces_an_earlier_demo_output(tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise ModelLoaded  # the first stage: the folder has been prepared

    monkeypatch.setattr(demo, "write_synthetic_world", stop)
    users = tmp_path / "users"
    users.mkdir()
    (users / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="holds files that the demo did not write"):
        demo.main(["--output_dir", str(users)])
    assert (users / "thesis.txt").read_text() == "years of work"

    earlier = tmp_path / "earlier"
    with pytest.raises(ModelLoaded):
        demo.main(["--output_dir", str(earlier)])  # a new folder: marked as the demo's
    (earlier / "summary.json").write_text("{}")
    with pytest.raises(ModelLoaded):
        demo.main(["--output_dir", str(earlier)])
    assert sorted(p.name for p in earlier.iterdir()) == sorted([demo.DEMO_MARKER, demo.DEMO_LOCK])
    # A file of the user's own dropped into an earlier demo output is refused, not deleted with it.
    (earlier / "vikdf").mkdir()
    (earlier / "vikdf_notes.txt").write_text("mine")  # named like the demo's own `vikdf*` entries
    with pytest.raises(ValueError, match=r"did not write \(vikdf_notes.txt\)"):
        demo.main(["--output_dir", str(earlier)])
    assert (earlier / "vikdf_notes.txt").read_text() == "mine" and (earlier / "vikdf").is_dir()


def test_a_second_demo_into_a_folder_a_demo_is_writing_is_refused_and_deletes_nothing(tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(demo, "write_synthetic_world", stop)
    out = tmp_path / "demo"
    with pytest.raises(ModelLoaded):
        demo.main(["--output_dir", str(out)])
    (out / "summary.json").write_text("{}")  # the first run's output so far
    with folder_lock(out, name=demo.DEMO_LOCK):  # the first run, still writing
        with pytest.raises(RuntimeError, match="is being written by another run"):
            demo.main(["--output_dir", str(out)])
    assert (out / "summary.json").read_text() == "{}"
