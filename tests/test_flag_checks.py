"""Flags, config fields and loader inputs that make no sense are refused before any model loads, naming the flag,
field, tensor or file (issue 22, items 9, 10 and 12)."""

import json
import shutil
import types

import pytest
import torch
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import eval_dialogue
import train_dialogue
import train_pretrain
import vikdf.evaluation.dialogues
from pipeline_vikdf import VIKDFDialoguePipeline, textualise_knowledge
from pretrain_helpers import pretrain_argv
from vikdf.checks import fit_generation_length, load_checkpoint_config
from vikdf.testing import tiny_vikdf_config

QUICK = ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def saved(tiny_components, save_tiny_vikdf, tmp_path_factory):
    """A tiny checkpoint, its component folders and a dialogue file."""
    root = tmp_path_factory.mktemp("flag_checks")
    dialogues = root / "dialogues.json"
    dialogues.write_text(json.dumps([{"context": ["a dog in the park"], "response": "with a red ball."}] * 2))
    return {"root": root, "ckpt": save_tiny_vikdf(root / "ckpt"), "dialogues": dialogues,
            "components": tiny_components("llama")}


@pytest.fixture
def no_model_load(monkeypatch):
    """Every entry point's model load fails loudly: a check that comes after it is a check too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vikdf.evaluation.dialogues, "load_checkpoint", refuse)
    monkeypatch.setattr(train_pretrain, "build_model", refuse)


def _train_dialogue(saved, *flags):
    train_dialogue.main(["--model_name_or_path", str(saved["ckpt"]), "--train_file", str(saved["dialogues"]),
                         "--output_dir", str(saved["root"] / "dialogue"), *QUICK, *flags])


def _eval(saved, *flags):
    eval_dialogue.main(["--model_name_or_path", str(saved["ckpt"]), "--test_file", str(saved["dialogues"]),
                        "--output_dir", str(saved["root"] / "eval"), *flags])


def _pretrain(saved, **options):
    # The sources are never read: every check below comes first.
    train_pretrain.main(pretrain_argv(saved["components"], "wds:/nowhere/{0..1}.tar", saved["root"] / "pre", **options))


# ------------------------------------------------------------------------------------------------ item 9: flags
@pytest.mark.parametrize(
    "entry, flags, message",
    [
        (_train_dialogue, ["--max_response_length", "0"], "--max_response_length 0 must be positive"),
        (_train_dialogue, ["--max_response_length", "-3"], "--max_response_length -3 must be positive"),
        (_train_dialogue, ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0 must be positive"),
        (_eval, ["--max_test_dialogues", "-2"], "--max_test_dialogues -2 must be positive"),
        (_eval, ["--num_beams", "0"], "--num_beams 0 must be positive"),
        (_eval, ["--batch_size", "0"], "--batch_size 0 must be positive"),
        (_eval, ["--textualise", "-1"], r"--textualise -1 must be 0 \(off\) or positive"),
        (_train_dialogue, ["--num_train_epochs", "0"], "--num_train_epochs 0.0 must be above 0"),
        (_eval, ["--do_sample", "true", "--temperature", "0"], "--temperature 0.0 with --do_sample must be above 0"),
        (_eval, ["--do_sample", "true", "--top_p", "1.5"], r"--top_p 1.5 with --do_sample must lie in \(0, 1\]"),
    ],
)
def test_nonsense_flags_are_refused_before_the_model_loads(saved, no_model_load, entry, flags, message):
    with pytest.raises(ValueError, match=message):
        entry(saved, *flags)


@pytest.mark.parametrize("flag, value", [("per_device_train_batch_size", 0), ("max_steps", 0), ("max_steps", -1)])
def test_a_zero_pretraining_batch_or_schedule_is_refused_before_the_towers_load(saved, no_model_load, flag, value):
    with pytest.raises(ValueError, match=f"--{flag} {value} must be positive"):
        _pretrain(saved, **{flag: value})


@pytest.mark.parametrize(
    "overrides, message",
    [
        *[({f"loss_weight_{name}": -5}, f"loss_weight_{name}=-5 .*negative")
          for name in ("tim", "tamim", "iamtm", "iaci", "iakr")],
        ({"mask_patch_size": 7}, "mask_patch_size=7 must be a multiple of the vision patch size"),
        ({"mask_ratio": 1.5}, r"mask_ratio=1.5 must lie in \[0, 1\]"),
        ({"text_mask_keep_ratio": -0.1}, r"text_mask_keep_ratio=-0.1 must lie in \[0, 1\]"),
        ({"mask_patch_size": 0}, "mask_patch_size=0 must be positive"),
    ],
)
def test_config_values_that_make_no_sense_are_refused_before_the_towers_load(saved, no_model_load, overrides, message):
    for continued in ({}, {"model_name_or_path": saved["ckpt"]}):  # built from the parts, or from a checkpoint
        with pytest.raises(ValueError, match=f"--config_overrides: {message}"):
            _pretrain(saved, config_overrides=json.dumps(overrides), **continued)


# ----------------------------------------------------------------------------------------------- item 10: loaders
def test_a_config_that_does_not_fit_its_weights_names_the_tensor_both_shapes_and_the_file(
    saved, no_model_load, tmp_path
):
    edited = tmp_path / "edited"
    shutil.copytree(saved["ckpt"], edited)
    config = json.loads((edited / "config.json").read_text())
    config["tim_embed_dim"] = 24  # the checkpoint's TIM projections are 16 wide
    (edited / "config.json").write_text(json.dumps(config))
    message = r"edited/model.safetensors holds tim_\w+_projection.bias of shape \(16,\) but .*config.json .* \(24,\)"
    with pytest.raises(ValueError, match=message):
        load_checkpoint_config(str(edited))
    with pytest.raises(ValueError, match=message):
        eval_dialogue.main(["--model_name_or_path", str(edited), "--test_file", str(saved["dialogues"]),
                            "--output_dir", str(tmp_path / "eval")])


def test_a_relative_path_typo_says_the_folder_does_not_exist_not_that_the_hub_is_unreachable(
    saved, no_model_load, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "pretrain").mkdir(parents=True)
    for call in (
        lambda: eval_dialogue.main(["--model_name_or_path", "runs/pretrian", "--test_file", str(saved["dialogues"])]),
        lambda: _pretrain(saved, llm_model="runs/llm"),
    ):
        with pytest.raises(FileNotFoundError, match="'runs/.*': no such folder in runs") as err:
            call()
        assert "huggingface" not in str(err.value).lower()
    with pytest.raises(FileNotFoundError, match="did you mean 'runs/pretrain'"):
        eval_dialogue.main(["--model_name_or_path", "runs/pretrian", "--test_file", str(saved["dialogues"])])


@pytest.mark.parametrize("device, message", [("cuda", "--device cuda but no GPU is visible"),
                                             ("gpu", "--device 'gpu' is not a device")])
def test_a_device_that_is_not_there_is_refused_before_the_model_loads(
    saved, no_model_load, monkeypatch, device, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=message):
        _eval(saved, "--device", device)


@pytest.mark.parametrize("inputs, error, message", [
    ([], ValueError, "an empty list"),
    (None, TypeError, "got NoneType: None"),
    (123, TypeError, "got int: 123"),
])
def test_the_pipeline_refuses_empty_none_or_non_text_inputs_clearly(build_tiny, inputs, error, message):
    model, processor = build_tiny("llama")
    with pytest.raises(error, match=message):
        VIKDFDialoguePipeline(model=model, processor=processor)(inputs)


# ---------------------------------------------------------------------------------------------- item 12: output
@pytest.mark.parametrize(
    "family, template_text", [("llama", " [/INST]"), ("qwen2", "<|im_end|>\n<|im_start|>assistant\n")]
)
def test_textualised_knowledge_holds_only_what_the_llm_wrote(build_tiny, monkeypatch, family, template_text):
    # A dialogue-tuned LLM reading the caption layout may write the template's reply marker first.
    model, processor = build_tiny(family)
    written = processor.tokenizer(template_text + " a red ball", add_special_tokens=False)["input_ids"]

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor([written] * len(input_ids))], dim=1)

    monkeypatch.setattr(model, "generate", generate)
    assert textualise_knowledge(model, processor, ["a dog in the park"]) == ["a red ball"]


def test_the_prompt_fitting_warning_is_printed_once_per_process():
    config = tiny_vikdf_config()  # 512 LLM positions
    with CaptureLogger(logging.get_logger("vikdf.checks")) as captured:
        for _ in range(3):  # eval_dialogue.main run three times in one process, as the demo runs it
            fit_generation_length(config, types.SimpleNamespace(max_length=509), 41)
    assert captured.out.count("Prompts of up to 509 tokens plus --max_new_tokens 41") == 1
