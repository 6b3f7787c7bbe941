"""Never a half-written checkpoint: a run killed at any point of a save resumes to the uninterrupted result."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

import train_dialogue
import train_pretrain
import vikdf.training.trainers
from dialogue_helpers import dialogue_argv, write_dialogue_world
from pretrain_helpers import pretrain_argv
from vikdf.atomic import last_complete_checkpoint, write_text_atomic
from vikdf.evaluation.model_card import update_model_card_metrics
from vikdf.training.trainable_checkpoints import TRAINABLE_WEIGHTS_NAME
from vikdf.training.trainers import resolve_resume_checkpoint, stream_state_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KILLED = 17
# 4 dialogues, batch 2, 4 epochs: 8 steps, checkpoints after steps 3, 6 and 8 (the last step), then the final save.
MAX_STEPS, KILL_STEP = 8, 6


@pytest.fixture(scope="module")
def world(save_tiny_vikdf, tmp_path_factory):
    return write_dialogue_world(tmp_path_factory.mktemp("atomic"), save_tiny_vikdf)


def _run_killed(argv: list[str], point: str, script: str = "train_dialogue") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    return subprocess.run(
        [sys.executable, str(HERE / "kill_during_save.py"), script, point, str(KILL_STEP), *argv],
        env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def uninterrupted(world):
    output_dir = world["root"] / "uninterrupted"
    train_dialogue.main(dialogue_argv(world, output_dir))
    return load_file(output_dir / "model.safetensors")


@pytest.mark.parametrize("point", ["before_weights", "after_weights", "after_optimizer"])
def test_a_run_killed_while_checkpointing_resumes_to_the_same_weights(world, uninterrupted, point):
    output_dir = world["root"] / point
    killed = _run_killed(dialogue_argv(world, output_dir), point)
    assert killed.returncode == KILLED, killed.stderr[-3000:]

    # The interrupted save left no folder that looks like a checkpoint; the newest one is the complete step 3.
    assert not (output_dir / f"checkpoint-{KILL_STEP}").exists()
    assert get_last_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-3")
    assert last_complete_checkpoint(output_dir) == output_dir / "checkpoint-3"
    # What it resumes from holds the trainable parameters, not the model (vikdf.training.trainable_checkpoints).
    assert [p.name for p in (output_dir / "checkpoint-3").glob("*.safetensors")] == [TRAINABLE_WEIGHTS_NAME]

    resumed = train_dialogue.main(dialogue_argv(world, output_dir) + ["--resume_from_checkpoint", "last"])
    assert resumed.trainer.state.global_step == MAX_STEPS
    final = load_file(output_dir / "model.safetensors")
    assert final.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(final[name], tensor), name
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert not list(output_dir.glob("_saving-*"))  # the resumed run's saves replaced the staging leftovers


def test_a_pretraining_run_killed_while_checkpointing_resumes_to_the_same_weights(tiny_components, pair_world, tmp_path):
    def argv(output_dir):
        return pretrain_argv(
            tiny_components("llama"), "wds:" + pair_world.train_shards, output_dir,
            max_steps=MAX_STEPS, save_steps=3, logging_steps=2, learning_rate=1e-3,
        )

    train_pretrain.main(argv(tmp_path / "a"))
    killed = _run_killed(argv(tmp_path / "b"), "after_weights", script="train_pretrain")
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert not (tmp_path / "b" / f"checkpoint-{KILL_STEP}").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoint-3").glob("*.safetensors")) == [
        stream_state_name(0), TRAINABLE_WEIGHTS_NAME
    ]
    train_pretrain.main(argv(tmp_path / "b") + ["--resume_from_checkpoint", "last"])
    expected, final = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(final[name], tensor), name


def test_a_run_stopped_during_the_final_save_leaves_no_loadable_half_folder(world, monkeypatch):
    output_dir = world["root"] / "final"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the final save is written to its staging folder, but never moved in

    monkeypatch.setattr(vikdf.training.trainers, "commit_folder", stopped)
    with pytest.raises(KeyboardInterrupt):
        train_dialogue.main(dialogue_argv(world, output_dir))
    assert not (output_dir / "config.json").exists() and not (output_dir / "model.safetensors").exists()
    assert (output_dir / "_saving-model" / "model.safetensors").is_file()
    assert last_complete_checkpoint(output_dir) == output_dir / f"checkpoint-{MAX_STEPS}"


def test_an_incomplete_checkpoint_is_refused_and_last_skips_it(tmp_path):
    complete, broken = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    complete.mkdir()
    (complete / "trainer_state.json").write_text("{}")
    broken.mkdir()
    (broken / "config.json").write_text("")  # what a kill during Trainer's in-place save left behind
    assert resolve_resume_checkpoint("last", str(tmp_path)) == str(complete)
    with pytest.raises(ValueError, match="checkpoint-4' is incomplete .*--resume_from_checkpoint last"):
        resolve_resume_checkpoint(str(broken), str(tmp_path))
    assert resolve_resume_checkpoint("last", str(tmp_path / "fresh")) is None  # nothing yet: a fresh start


def test_model_card_metrics_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    card = tmp_path / "README.md"
    update_model_card_metrics(tmp_path, {"ppl": 10.0}, "test.json")
    before = card.read_text()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        update_model_card_metrics(tmp_path, {"ppl": 20.0}, "other.json")
    assert card.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["README.md"]
    monkeypatch.undo()
    write_text_atomic(card, "new")
    assert card.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["README.md"]
