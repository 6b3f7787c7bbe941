"""Checkpoints that hold what trains (`vikdf.training.trainable_checkpoints`): what a checkpoint holds and its size, exact
resumes from trainable-only and from whole-model checkpoints, the refusal of changed frozen weights or foreign
trainable tensors, damaged files found, and whole-model folders loading with `AutoModel`.

A killed run resuming bit-exact from a trainable-only checkpoint is `tests/test_atomic_checkpoints.py`; the same
under two-process DeepSpeed is `tests/test_deepspeed_multiprocess.py`."""

import json
import re
import shutil

import pytest
import torch
from conftest import run_outside_the_checkout
from dialogue_helpers import dialogue_argv, write_dialogue_world
from pretrain_helpers import pretrain_argv
from safetensors.torch import load_file, save_file

import train_dialogue
import train_pretrain
import vikdf.evaluation.dialogues
from vikdf.atomic import last_complete_checkpoint
from vikdf.testing import write_tiny_components
from vikdf.training.frozen_parts import FROZEN_PARTS_NAME, fingerprint, frozen_components
from vikdf.training.trainable_checkpoints import TRAINABLE_WEIGHTS_NAME, trainable_parameters
from vikdf.training.trainers import resolve_resume_checkpoint

# What a checkpoint holds besides the trainable tensors and the optimizer state: config.json, frozen_parts.json,
# trainer_state.json, rng_state.pth and scheduler.pt (about 25 KB here).
ALLOWANCE_BYTES = 64 * 1024


class ModelLoaded(Exception):
    """Raised where a model would load: a check that must come first did not."""


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def world(save_tiny_vikdf, tmp_path_factory):
    return write_dialogue_world(tmp_path_factory.mktemp("trainable"), save_tiny_vikdf)


@pytest.fixture(scope="module")
def runs(world):
    """An 8-step run with whole-model checkpoints (`--save_full_model`), and a run resumed from its checkpoint-3 into
    another folder with the default checkpoints (steps 6 and 8)."""
    full, resumed = world["root"] / "full", world["root"] / "resumed"
    train_dialogue.main(dialogue_argv(world, full, "--save_full_model", "true"))
    result = train_dialogue.main(dialogue_argv(world, resumed, "--resume_from_checkpoint", str(full / "checkpoint-3")))
    return {"full": full, "resumed": resumed, "model": result.model}


def test_a_checkpoint_holds_the_trainable_parameters_the_resume_state_and_the_frozen_parts_record(world, runs):
    checkpoint, model = runs["resumed"] / "checkpoint-6", runs["model"]
    sizes = {path.name: path.stat().st_size for path in checkpoint.iterdir()}
    assert [name for name in sizes if name.endswith(".safetensors")] == [TRAINABLE_WEIGHTS_NAME]  # no model weights
    trainable = trainable_parameters(model)
    saved = load_file(checkpoint / TRAINABLE_WEIGHTS_NAME)
    assert saved.keys() == trainable.keys() and {name.split(".")[0] for name in saved} == {
        "query_tokens", "iq_former", "language_projection"
    }
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    assert sum(sizes.values()) <= trainable_bytes + sizes["optimizer.pt"] + ALLOWANCE_BYTES, sizes

    # Each frozen component: its source (the checkpoint fine-tuned), and the fingerprint of the weights it has (the
    # final model's: frozen weights do not change in training).
    record = json.loads((checkpoint / FROZEN_PARTS_NAME).read_text())["components"]
    frozen = frozen_components(model)
    assert set(record) == set(frozen) == {"text_encoder", "text_projection", "language_model"}
    for component, entry in record.items():
        expected = {"source": str(world["pretrained"]), "revision": None, "fingerprint": fingerprint(frozen[component])}
        assert entry == expected, component


def test_a_trainable_only_checkpoint_is_no_model_to_start_from(world, runs, tmp_path, monkeypatch):
    monkeypatch.setattr(vikdf.evaluation.dialogues, "load_checkpoint", lambda *a, **k: (_ for _ in ()).throw(ModelLoaded()))
    argv = dialogue_argv(world, tmp_path / "out")
    argv[argv.index("--model_name_or_path") + 1] = str(runs["resumed"] / "checkpoint-6")
    with pytest.raises(ValueError, match="is a training checkpoint holding the trainable parameters only"):
        train_dialogue.main(argv)


def test_a_whole_model_checkpoint_resumes_exactly_and_whole_model_folders_load_with_automodel(runs, tmp_path):
    full_checkpoint = runs["full"] / "checkpoint-3"
    assert (full_checkpoint / "model.safetensors").is_file() and not (full_checkpoint / FROZEN_PARTS_NAME).exists()
    # Resumed through the Trainer's own loader, the run ends where the uninterrupted one did.
    final = load_file(runs["resumed"] / "model.safetensors")
    _assert_same_weights(final, load_file(runs["full"] / "model.safetensors"))
    moved = load_file(full_checkpoint / "model.safetensors")["language_projection.weight"]
    assert not torch.equal(moved, final["language_projection.weight"])  # steps 4-8 trained: the comparison tells

    # A --save_full_model checkpoint and a final output folder, loaded as a user does: remote code, another process.
    script = f"""
import torch
from safetensors.torch import load_file
from transformers import AutoModel
for folder in {[str(full_checkpoint), str(runs["resumed"])]!r}:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    state = model.state_dict()
    for name, tensor in load_file(folder + "/model.safetensors").items():
        assert torch.equal(state[name], tensor), (folder, name)
    print("LOADED", type(model).__name__)
"""
    result = run_outside_the_checkout(script, tmp_path)
    assert result.stdout.count("LOADED VIKDFForConditionalGeneration") == 2, result.stdout + result.stderr[-3000:]


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(world):
    uninterrupted, resumed = world["root"] / "lora", world["root"] / "lora-resumed"
    train_dialogue.main(dialogue_argv(world, uninterrupted, "--method", "lora"))
    checkpoint = uninterrupted / "checkpoint-3"
    adapters = load_file(checkpoint / TRAINABLE_WEIGHTS_NAME)
    assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
    frozen = json.loads((checkpoint / FROZEN_PARTS_NAME).read_text())["components"]
    assert {"language_model", "iq_former"} <= set(frozen)
    train_dialogue.main(dialogue_argv(world, resumed, "--method", "lora", "--resume_from_checkpoint", str(checkpoint)))
    _assert_same_weights(load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors"))


def test_the_best_checkpoint_loaded_at_the_end_is_its_trainable_parameters(world, tmp_path):
    # The highest validation loss is "best" here: the first checkpoint, whose weights the last step no longer has.
    out = tmp_path / "best"
    result = train_dialogue.main(dialogue_argv(
        world, out, "--validation_file", str(world["train"]), "--eval_strategy", "steps", "--eval_steps", "3",
        "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss", "--greater_is_better", "true",
    ))  # fmt: skip
    assert result.trainer.state.best_model_checkpoint == str(out / "checkpoint-3")
    best = load_file(out / "checkpoint-3" / TRAINABLE_WEIGHTS_NAME)
    final = load_file(out / "model.safetensors")
    last = load_file(out / "checkpoint-8" / TRAINABLE_WEIGHTS_NAME)
    assert any(not torch.equal(last[name], tensor) for name, tensor in best.items())  # loading it changes the model
    for name, tensor in best.items():
        assert torch.equal(final[name], tensor), name


def test_changed_frozen_weights_are_refused_naming_the_component_and_both_fingerprints(pair_world, tmp_path):
    components = write_tiny_components(tmp_path / "components", "llama")  # its own: the LLM is edited below
    argv = pretrain_argv(components, "wds:" + pair_world.train_shards, tmp_path / "run", save_steps=2, logging_steps=1)
    train_pretrain.main(argv + ["--max_steps", "2"])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    record = json.loads((checkpoint / FROZEN_PARTS_NAME).read_text())["components"]
    assert {name: entry["source"] for name, entry in record.items()} == {
        "text_encoder": str(components.clip), "text_projection": str(components.clip),
        "vision_encoder": str(components.clip), "visual_projection": str(components.clip),
        "language_model": str(components.llm),
    }  # fmt: skip

    weights_file = components.llm / "model.safetensors"
    weights = load_file(weights_file)
    name = next(name for name in sorted(weights) if name.endswith("mlp.down_proj.weight"))
    weights[name][0, 0] += 1.0  # one value of one tensor: the file's header does not change
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError) as refused:
        train_pretrain.main(argv + ["--max_steps", "4", "--resume_from_checkpoint", str(checkpoint)])
    message = str(refused.value)
    recorded = record["language_model"]["fingerprint"]
    assert f"'language_model' differs from the one {checkpoint} was trained with" in message
    (now,) = re.findall(rf"{recorded} in {checkpoint / FROZEN_PARTS_NAME} .*, ([0-9a-f]{{64}}) in this run", message)
    assert now != recorded and "--save_full_model" in message
    assert not (tmp_path / "run" / "checkpoint-4").exists()  # refused before any step


def test_a_run_with_a_4bit_llm_resumes_its_packed_weights_and_quantisation_state_fingerprinted(
    tiny_components, pair_world, tmp_path
):
    pytest.importorskip("bitsandbytes")
    argv = pretrain_argv(tiny_components("llama"), "wds:" + pair_world.train_shards, tmp_path / "run", save_steps=2,
                         logging_steps=1, llm_quantization="4bit")
    trainer = train_pretrain.main(argv + ["--max_steps", "2"])
    llm = frozen_components(trainer.model)["language_model"]
    assert any(tensor.dtype == torch.uint8 for tensor in llm.values())  # packed 4-bit weights
    assert any(".quant_state." in name for name in llm) and any(name.endswith(".absmax") for name in llm)
    # Quantising the rebuilt LLM gives the same bytes: the checkpoint is not refused.
    checkpoint = tmp_path / "run" / "checkpoint-2"
    resumed = train_pretrain.main(argv + ["--max_steps", "4", "--resume_from_checkpoint", str(checkpoint)])
    assert resumed.state.global_step == 4 and (tmp_path / "run" / "checkpoint-4" / TRAINABLE_WEIGHTS_NAME).is_file()


def test_trainable_tensors_that_are_not_what_the_run_trains_are_refused_naming_the_file(world, runs, tmp_path):
    checkpoint = tmp_path / "checkpoint-6"
    shutil.copytree(runs["resumed"] / "checkpoint-6", checkpoint)
    tensors = load_file(checkpoint / TRAINABLE_WEIGHTS_NAME)
    del tensors["language_projection.bias"]
    save_file(tensors, checkpoint / TRAINABLE_WEIGHTS_NAME)
    file = checkpoint / TRAINABLE_WEIGHTS_NAME
    message = rf"{file} does not hold what this run trains: missing \['language_projection.bias'\]"
    with pytest.raises(ValueError, match=message):
        train_dialogue.main(dialogue_argv(world, tmp_path / "out", "--resume_from_checkpoint", str(checkpoint)))


@pytest.mark.parametrize("damaged", [TRAINABLE_WEIGHTS_NAME, FROZEN_PARTS_NAME])
def test_a_damaged_file_of_a_trainable_checkpoint_is_found(runs, tmp_path, damaged):
    for step in (6, 8):
        shutil.copytree(runs["resumed"] / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    path = tmp_path / "checkpoint-8" / damaged
    path.write_bytes(path.read_bytes()[:40])  # cut short, as a full disk or a failed copy leaves it
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    with pytest.raises(ValueError, match=f"checkpoint-8' is damaged: {re.escape(str(path))}"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-8"), str(tmp_path))


def test_fingerprint_reads_the_values_of_any_layout_and_dtype():
    torch.manual_seed(0)
    tensors = {"b": torch.randn(3, 5, dtype=torch.bfloat16), "a": torch.randn(4, 6).t(), "c": torch.tensor(2.0)}
    assert not tensors["a"].is_contiguous()
    same = {name: tensor.contiguous().clone() for name, tensor in tensors.items()}
    assert fingerprint(same) == fingerprint(tensors)
    for name in tensors:
        changed = {**same, name: same[name].clone()}
        changed[name].view(-1)[0] += 1  # one value
        assert fingerprint(changed) != fingerprint(tensors), name
    assert fingerprint({**same, "b": same["b"].float()}) != fingerprint(tensors)  # same values, another dtype
    assert fingerprint({**same, "b": same["b"].reshape(5, 3)}) != fingerprint(tensors)  # same bytes, another shape


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hub_strategies_that_upload_checkpoint_folders_need_save_full_model(world, tmp_path, monkeypatch, strategy):
    def refuse(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr(vikdf.evaluation.dialogues, "load_checkpoint", refuse)
    argv = dialogue_argv(world, tmp_path / "out", "--push_to_hub", "true", "--hub_strategy", strategy)
    refusal = f"--hub_strategy {strategy} uploads checkpoint folders .* add --save_full_model"
    with pytest.raises(ValueError, match=refusal):
        train_dialogue.main(argv)
    with pytest.raises(ModelLoaded):  # accepted with whole-model checkpoints
        train_dialogue.main(argv + ["--save_full_model", "true"])
