"""train_dialogue.py → eval_dialogue.py end to end on tiny models (paper §3.4, §4.1, §4.4, Table 1 and Table 4)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, HfArgumentParser

import eval_dialogue
import train_dialogue
from vikdf.evaluation.dialogues import METRIC_KEYS, load_checkpoint, perplexities, response_nll
from vikdf.evaluation.model_card import PLACEHOLDER_REPO
from vikdf.training.arguments import DialogueTrainingArguments
from vikdf.training.quantization import LLMQuantizationArguments

TRAIN = [
    (["what did you do this weekend?"], "i went hiking in the mountains."),
    (["a dog in the park", "is it playing?"], "yes, with a red ball."),
    (["the cat sleeps on a blue sofa"], "that sounds great, i love cats."),
    (["i think the weather will be sunny tomorrow"], "let's go to the beach!"),
    (["two people are sitting at a table", "in a restaurant"], "what are they eating?"),
    (["a man riding a bike down a busy city street"], "that looks dangerous."),
    (["a bowl of fruit on a wooden table"], "apples, bananas and oranges."),
    (["i love the view from the top"], "me too, it is beautiful."),
]
TEST = [
    ["Curious", "the sky looks so big tonight", "i wonder what is up there."],
    ["Happy", "a dog playing in the park", "it looks so happy!"],
    ["Calm", "a cat on the sofa", "sleeping all day long."],
]
QUICK = ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0"]


@pytest.fixture(scope="module")
def world(tiny_components, save_tiny_vikdf, tmp_path_factory):
    """A saved tiny VIKDF (as train_pretrain.py leaves it), a Reddit JSON train file and an Image-Chat test file."""
    root = tmp_path_factory.mktemp("dialogue")
    paths = tiny_components("llama")
    save_tiny_vikdf(root / "pretrained")
    train_file = root / "reddit" / "train.json"
    train_file.parent.mkdir()
    train_file.write_text(json.dumps([{"context": c, "response": r} for c, r in TRAIN]))
    test_file = root / "image_chat" / "test.json"
    test_file.parent.mkdir()
    test_file.write_text(json.dumps([{"image_hash": f"{i:032x}", "dialog": [[s, a], ["Other", b]]} for i, (s, a, b) in enumerate(TEST)]))
    glove = root / "glove.txt"  # a tiny GloVe-format file: unknown words take the mean vector
    glove.write_text("".join(f"{w} {' '.join(str((i * 7 + k) % 5 - 2) for k in range(6))}\n" for i, w in enumerate(
        ["the", "a", "dog", "cat", "sky", "i", "is", "happy", "sleeping", "up", "there", "."])))
    return {"root": root, "pretrained": root / "pretrained", "train": train_file, "test": test_file, "glove": glove,
            "llm": str(paths.llm)}


@pytest.fixture(scope="module")
def finetuned(world):
    """VIKDF dialogue fine-tuning on the Reddit-format file, then its checkpoint folder."""
    out = world["root"] / "vikdf"
    result = train_dialogue.main([
        "--model_name_or_path", str(world["pretrained"]), "--train_file", str(world["train"]), "--output_dir", str(out),
        "--num_train_epochs", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
        "--warmup_steps", "0", "--logging_steps", "4", *QUICK,
    ])
    return result


def ppl_on_training_dialogues(folder) -> float:
    model, processor = load_checkpoint(folder)
    return perplexities(*response_nll(model, processor, [c for c, _ in TRAIN], [r for _, r in TRAIN], batch_size=4))["ppl"]


def test_every_cli_field_has_help():
    classes = [train_dialogue.DialogueModelArguments, train_dialogue.DialogueDataArguments, eval_dialogue.EvalArguments,
               LLMQuantizationArguments]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    # The training dataclass inherits TrainingArguments' documented fields; the ones it (re)declares need their own.
    for cls in DialogueTrainingArguments.__mro__:
        if cls.__module__ in ("vikdf.training.arguments", "vikdf.defaults"):
            for name in vars(cls).get("__annotations__", {}):
                assert cls.__dataclass_fields__[name].metadata.get("help"), f"{cls.__name__}.{name} has no help text"


def test_vikdf_fine_tuning_saves_an_inference_checkpoint_that_fits_better(world, finetuned):
    out = finetuned.output_dir
    assert finetuned.trainer is not None and finetuned.num_train_dialogues == len(TRAIN)
    for name in ("config.json", "model.safetensors", "configuration_vikdf.py", "modeling_vikdf.py",
                 "processing_vikdf.py", "processor_config.json", "README.md"):
        assert (world["root"] / "vikdf" / name).exists(), name
    config = json.loads((world["root"] / "vikdf" / "config.json").read_text())
    assert config["include_pretraining_heads"] is False and config["dialogue_method"] == "vikdf"
    weights = load_file(world["root"] / "vikdf" / "model.safetensors")
    assert not any(key.startswith(("vision_encoder", "tamim", "iamtm", "iakr", "tim_")) for key in weights)

    # Only the queries, the IQ-Former and language_projection moved; the LLM and CLIP stayed frozen.
    before = load_file(world["pretrained"] / "model.safetensors")
    changed = {key.split(".")[0] for key in weights if not torch.equal(weights[key], before[key])}
    assert changed == {"query_tokens", "iq_former", "language_projection"}

    assert ppl_on_training_dialogues(out) < ppl_on_training_dialogues(world["pretrained"])

    # In a process that imported `vikdf` the Auto classes resolve to the installed VIKDF classes; loading from
    # the dynamic module in a fresh process is covered by test_model.py's round trip.
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "VIKDFForConditionalGeneration"
    torch.testing.assert_close(model.language_projection.weight, weights["language_projection.weight"])


def test_model_card_snippet_runs(world, finetuned, capsys):
    card = (world["root"] / "vikdf" / "README.md").read_text()
    snippets = [block.split("```", 1)[0] for block in card.split("```python\n")[1:]]
    snippet = next(s for s in snippets if "AutoModel" in s).replace(PLACEHOLDER_REPO, finetuned.output_dir)
    exec(compile(snippet.replace("max_new_tokens=32", "max_new_tokens=4"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and printed.count("'") + printed.count('"') >= 2  # one decoded response


def test_eval_writes_predictions_metrics_and_card_row(world, finetuned):
    out = world["root"] / "eval_vikdf"
    metrics = eval_dialogue.main([
        "--model_name_or_path", finetuned.output_dir, "--test_file", str(world["test"]), "--output_dir", str(out),
        "--glove_path", str(world["glove"]), "--batch_size", "2", "--textualise", "2",
    ])
    assert list(metrics) == list(METRIC_KEYS)
    assert all(math.isfinite(value) for value in metrics.values())
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    table = (out / "metrics.md").read_text().splitlines()
    assert table[0] == "| PPL | BLEU-1 | ROUGE-L | Average | Extrema | Greedy | Dis-1 | Dis-2 |" and table[3] == ""
    assert table[4].startswith("PPL: exp of the mean over dialogues") and table[5].startswith("Word tokeniser")

    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["context"] for p in predictions] == [[a] for _, a, _ in TEST]  # Image-Chat: lowercased turns
    assert [p["reference"] for p in predictions] == [b for _, _, b in TEST]
    assert all(isinstance(p["hypothesis"], str) for p in predictions)
    knowledge = [json.loads(line) for line in (out / "knowledge.jsonl").read_text().splitlines()]
    assert len(knowledge) == 2 and all(isinstance(k["knowledge"], str) for k in knowledge)
    assert json.loads((out / "eval_info.json").read_text())["with_knowledge"] is True

    card = (world["root"] / "vikdf" / "README.md").read_text()
    assert f"`{Path(world['llm']).name}` (a local folder)" in card and world["llm"] not in card  # no local path
    assert "| Test set | PPL | BLEU-1 | ROUGE-L | Average | Extrema | Greedy | Dis-1 | Dis-2 |" in card
    assert f"| image_chat/test.json | {metrics['ppl']:.2f} |" in card


def test_frozen_llm_baseline_runs_without_knowledge(world, finetuned):
    out = world["root"] / "eval_llm"
    card_before = (world["root"] / "vikdf" / "README.md").read_text()
    metrics = eval_dialogue.main([
        "--model_name_or_path", finetuned.output_dir, "--test_file", str(world["test"]), "--output_dir", str(out),
        "--baseline", "llm", "--max_new_tokens", "8",
    ])
    assert math.isfinite(metrics["ppl"]) and metrics["embedding_average"] is None
    assert "| – | – | – |" in (out / "metrics.md").read_text()
    assert json.loads((out / "eval_info.json").read_text())["with_knowledge"] is False
    assert (world["root"] / "vikdf" / "README.md").read_text() == card_before  # a baseline does not touch the card


def test_lora_baseline_trains_merges_and_evaluates_without_knowledge(world):
    out = world["root"] / "lora"
    # Also the data options: a malformed record skipped, half of the rest kept, one context turn each.
    train_file = world["root"] / "reddit" / "train_with_bad_record.json"
    train_file.write_text(json.dumps([{"context": [], "response": "no context"}, *json.loads(world["train"].read_text())]))
    result = train_dialogue.main([
        "--model_name_or_path", str(world["pretrained"]), "--train_file", str(train_file), "--output_dir", str(out),
        "--method", "lora", "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2",
        "--lora_target_modules", "q_proj,v_proj", "--train_fraction", "0.5", "--skip_bad_records",
        "--max_context_turns", "1", *QUICK,
    ])
    assert result.num_train_dialogues == len(TRAIN) // 2
    assert all(len(d.context) == 1 for d in result.trainer.train_dataset)
    weights = load_file(out / "model.safetensors")
    before = load_file(world["pretrained"] / "model.safetensors")
    assert not any("lora" in key for key in weights)
    changed = {key for key in weights if not torch.equal(weights[key], before[key])}
    assert changed and all(key.startswith("language_model.") and key.endswith(("q_proj.weight", "v_proj.weight")) for key in changed)
    assert json.loads((out / "config.json").read_text())["dialogue_method"] == "lora"
    assert "with_knowledge=False" in (out / "README.md").read_text()

    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    key = next(iter(changed))
    torch.testing.assert_close(model.state_dict()[key], weights[key])

    metrics = eval_dialogue.main([
        "--model_name_or_path", str(out), "--test_file", str(world["test"]), "--output_dir", str(world["root"] / "eval_lora"),
        "--max_new_tokens", "8",
    ])
    assert math.isfinite(metrics["ppl"])
    assert json.loads((world["root"] / "eval_lora" / "eval_info.json").read_text())["with_knowledge"] is False


def test_freeze_iq_former_fine_tunes_the_projection_alone(world):
    out = world["root"] / "projection_only"
    train_dialogue.main([
        "--model_name_or_path", str(world["pretrained"]), "--train_file", str(world["train"]), "--output_dir", str(out),
        "--freeze_iq_former", "true", "--num_train_epochs", "1", "--per_device_train_batch_size", "4",
        "--learning_rate", "3e-3", *QUICK,
    ])
    weights = load_file(out / "model.safetensors")
    before = load_file(world["pretrained"] / "model.safetensors")
    changed = {key.split(".")[0] for key in weights if not torch.equal(weights[key], before[key])}
    assert changed == {"language_projection"}
    with pytest.raises(ValueError, match="--freeze_iq_former .* --method vikdf only"):
        train_dialogue.main(["--model_name_or_path", str(world["pretrained"]), "--train_file", str(world["train"]),
                             "--output_dir", str(world["root"] / "refused"), "--method", "lora",
                             "--freeze_iq_former", "true", *QUICK])
    with pytest.raises(ValueError, match="--lora_r 0 must be positive"):
        train_dialogue.main(["--model_name_or_path", str(world["pretrained"]), "--train_file", str(world["train"]),
                             "--output_dir", str(world["root"] / "refused"), "--method", "lora", "--lora_r", "0",
                             *QUICK])


def test_zero_resource_fraction_saves_without_training(world):
    out = world["root"] / "zero"
    result = train_dialogue.main(["--model_name_or_path", str(world["pretrained"]), "--train_fraction", "0",
                                  "--output_dir", str(out), *QUICK])
    assert result.trainer is None and result.num_train_dialogues == 0
    weights = load_file(out / "model.safetensors")
    before = load_file(world["pretrained"] / "model.safetensors")
    assert all(torch.equal(tensor, before[key]) for key, tensor in weights.items())
    assert "vision_encoder.embeddings.patch_embedding.weight" not in weights
    assert "zero-resource" in (out / "README.md").read_text()
    model, _ = load_checkpoint(out)
    assert model.vision_encoder is None


def test_clear_errors(world):
    with pytest.raises(ValueError, match="--train_file is required"):
        train_dialogue.main(["--model_name_or_path", str(world["pretrained"]), "--output_dir", str(world["root"] / "x"), *QUICK])
    with pytest.raises(ValueError, match="train_fraction"):
        train_dialogue.main(["--model_name_or_path", str(world["pretrained"]), "--train_file", str(world["train"]),
                             "--train_fraction", "2", "--output_dir", str(world["root"] / "x"), *QUICK])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        eval_dialogue.main(["--model_name_or_path", str(world["pretrained"]), "--test_file", str(world["root"] / "missing.json"),
                            "--output_dir", str(world["root"] / "x")])


def _parse_dialogue_flags(argv: list[str]):
    parser = HfArgumentParser((train_dialogue.DialogueModelArguments, train_dialogue.DialogueDataArguments,
                               DialogueTrainingArguments))
    return parser.parse_args_into_dataclasses(args=train_dialogue.with_preset(argv))


def test_paper_presets_set_the_released_fine_tuning_and_explicit_flags_win(world, tmp_path):
    required = ["--model_name_or_path", "m", "--train_file", str(world["train"]), "--output_dir", str(tmp_path)]
    _, data, training = _parse_dialogue_flags(["--preset", "paper-reddit", *required])
    assert (training.num_train_epochs, training.learning_rate, training.weight_decay) == (5, 1e-4, 0)
    assert training.warmup_steps == 0
    assert training.lr_scheduler_type == "linear"
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (4, 8)
    assert data.max_length == 128 + 32 + 32 and data.context_turns == "2,3" and data.max_context_turns is None
    assert data.max_response_length == 32 and data.subset == "first"
    # The Reddit rule drops (not truncates) contexts of other sizes: of TRAIN's 1- and 2-turn contexts, the 2-turn ones.
    kept = train_dialogue._load(data.train_file, data.train_format, data)
    assert [d.context for d in kept] == [tuple(c) for c, _ in TRAIN if len(c) == 2]

    _, data, training = _parse_dialogue_flags(["--preset=paper-image-chat", *required])
    assert training.num_train_epochs == 1 and data.context_turns is None and training.learning_rate == 1e-4

    # Flags given explicitly win wherever they stand.
    _, data, training = _parse_dialogue_flags(
        ["--learning_rate", "3e-4", "--preset", "paper-reddit", *required,
         "--context_turns", "3", "--num_train_epochs", "2"]
    )
    assert (training.learning_rate, training.num_train_epochs, data.context_turns) == (3e-4, 2, "3")
    assert training.gradient_accumulation_steps == 8  # the rest of the preset still holds
    # Without a preset nothing changes.
    _, data, training = _parse_dialogue_flags(required)
    assert training.num_train_epochs == 1 and training.weight_decay == 0.05 and data.context_turns is None
    assert data.max_response_length is None and data.subset == "random"
    with pytest.raises(ValueError, match="paper-reddit"):
        train_dialogue.with_preset(["--preset", "paper", *required])
