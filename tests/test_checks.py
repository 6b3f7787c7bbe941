"""Every user mistake caught before a model loads, with a message that names the flag or file and says what to do."""

import json
import logging as pylogging

import pytest
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

import eval_dialogue
import train_dialogue
import train_pretrain
from conftest import TINY_OVERRIDES
from modeling_vikdf import VIKDFForConditionalGeneration
from pretrain_helpers import pretrain_argv
from vikdf.checks import fit_generation_length
from vikdf.data.dialogue import load_dialogues
import vikdf.evaluation.dialogues
from vikdf.evaluation.dialogues import load_checkpoint
from vikdf.testing import tiny_vikdf_config

QUICK = ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def saved(tiny_components, tmp_path_factory):
    """A tiny pre-training checkpoint (8 queries, 512 LLM positions), a dialogue file and a GloVe file."""
    from vikdf.training.components import build_vikdf_from_components

    root = tmp_path_factory.mktemp("checks")
    paths = tiny_components("llama")
    model, processor = build_vikdf_from_components(str(paths.clip), str(paths.bert), str(paths.llm), **TINY_OVERRIDES)
    model.save_pretrained(root / "ckpt")
    processor.save_pretrained(root / "ckpt")
    train = root / "train.json"
    train.write_text(json.dumps([{"context": ["a dog in the park"], "response": "with a red ball."}] * 2))
    glove = root / "glove.txt"
    glove.write_text("the 0.1 0.2 0.3\ndog 0.4 0.5 0.6\n")
    return {"root": root, "ckpt": root / "ckpt", "train": train, "glove": glove, "components": paths}


@pytest.fixture
def no_model_load(monkeypatch):
    """Make every entry point's model load fail loudly: a check that comes after it is a check too late."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(vikdf.evaluation.dialogues, "load_checkpoint", refuse)  # both dialogue entry points load through it
    monkeypatch.setattr(train_pretrain, "build_model", refuse)


def _dialogue(saved, *extra):
    return ["--model_name_or_path", str(saved["ckpt"]), "--output_dir", str(saved["root"] / "out"), *QUICK, *extra]


def _eval(saved, *extra, test_file=None):
    return ["--model_name_or_path", str(saved["ckpt"]), "--test_file", str(test_file or saved["train"]),
            "--output_dir", str(saved["root"] / "eval"), *extra]


def _pretrain(saved, sources, **options):
    return pretrain_argv(saved["components"], sources, saved["root"] / "pre", max_steps=1, **options)


# ----------------------------------------------------------------------------------------------- 1. foreign configs
def test_a_foreign_or_incomplete_config_is_refused_in_one_line(saved, tmp_path):
    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    for load in (VIKDFForConditionalGeneration.from_pretrained, load_checkpoint):
        with pytest.raises(ValueError, match="model_type='llama', not 'vikdf'") as err:
            load(foreign)
        assert "\n" not in str(err.value)

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    config = json.loads((saved["ckpt"] / "config.json").read_text())
    del config["text_config"]
    (incomplete / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks text_config") as err:
        VIKDFForConditionalGeneration.from_pretrained(incomplete)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- 2. checks before the load
def test_train_dialogue_reads_its_data_before_loading_the_model(saved, no_model_load):
    with pytest.raises(IsADirectoryError, match="--train_file .* is a folder"):
        train_dialogue.main(_dialogue(saved, "--train_file", str(saved["root"])))
    with pytest.raises(FileNotFoundError, match="--train_file .*nothing.json.*no such file"):
        train_dialogue.main(_dialogue(saved, "--train_file", str(saved["root"] / "nothing.json")))
    bad = saved["root"] / "bad.json"
    bad.write_text(json.dumps([{"context": [], "response": "x"}]))
    with pytest.raises(ValueError, match="bad.json: record 0"):
        train_dialogue.main(_dialogue(saved, "--train_file", str(bad)))
    with pytest.raises(IsADirectoryError, match="--validation_file"):
        train_dialogue.main(_dialogue(saved, "--train_file", str(saved["train"]), "--validation_file", str(saved["root"])))


def test_train_pretrain_expands_its_shards_before_building_the_model(saved, no_model_load):
    with pytest.raises(FileNotFoundError, match="missing"):
        train_pretrain.main(_pretrain(saved, f"wds:{saved['root']}/shards/{{00000..00001}}.tar"))
    with pytest.raises(IsADirectoryError, match="is a folder, not a shard"):
        train_pretrain.main(_pretrain(saved, f"wds:{saved['root']}"))
    with pytest.raises(IsADirectoryError, match="COCO annotation file .* is a folder"):
        train_pretrain.main(_pretrain(saved, f"coco:{saved['root']}:{saved['root']}"))


def test_eval_validates_the_glove_file_before_generating(saved, no_model_load, tmp_path):
    with pytest.raises(FileNotFoundError, match="--glove_path .*no such file"):
        eval_dialogue.main(_eval(saved, "--glove_path", str(tmp_path / "glove.6B.300d.txt")))
    not_glove = tmp_path / "not_glove.txt"
    not_glove.write_text('[{"context": ["hi"], "response": "yo"}]\n')
    with pytest.raises(ValueError, match="--glove_path .* is not a GloVe text file: its first line"):
        eval_dialogue.main(_eval(saved, "--glove_path", str(not_glove)))
    ragged = tmp_path / "ragged.txt"
    ragged.write_text("the 0.1 0.2 0.3\ndog 0.4 five 0.6\n")
    with pytest.raises(ValueError, match="--glove_path: .*ragged.txt: entries 1-2 do not all have 3 numbers"):
        eval_dialogue.main(_eval(saved, "--glove_path", str(ragged)))
    with pytest.raises(IsADirectoryError, match="--test_file .* is a folder"):
        eval_dialogue.main(_eval(saved, test_file=tmp_path))


def test_a_too_small_max_length_is_refused_before_training(saved, no_model_load):
    with pytest.raises(ValueError, match="--max_length 40 leaves no room for the context: .* use at least"):
        train_dialogue.main(_dialogue(saved, "--train_file", str(saved["train"]), "--max_length", "40"))


def test_a_missing_local_model_folder_says_no_such_folder(saved, no_model_load, tmp_path):
    missing = tmp_path / "runs" / "pretrain"
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*pretrain.*: no such folder"):
        train_dialogue.main(["--model_name_or_path", str(missing), "--train_fraction", "0", "--output_dir", str(tmp_path), *QUICK])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        eval_dialogue.main(["--model_name_or_path", str(missing), "--test_file", str(saved["train"])])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train_pretrain.main(_pretrain(saved, f"wds:{saved['root']}", model_name_or_path=str(missing)))
    with pytest.raises(FileNotFoundError, match="--llm_model .*pretrain.*: no such folder"):
        train_pretrain.main(_pretrain(saved, f"wds:{saved['root']}", llm_model=str(missing)))
    with pytest.raises(OSError, match="'runs/pretrain': no such folder, and the Hub has no model"):
        eval_dialogue.main(["--model_name_or_path", "runs/pretrain", "--test_file", str(saved["train"])])
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_checkpoint(missing)


# ----------------------------------------------------------------------- 3. flags when continuing from a checkpoint
def test_flags_on_a_checkpoint_apply_or_are_refused(saved, no_model_load, pair_world):
    sources = "wds:" + pair_world.train_shards
    with pytest.raises(ValueError, match="--tim_pooling 'foo'; choose one of first, max"):
        train_pretrain.main(_pretrain(saved, sources, model_name_or_path=str(saved["ckpt"]), tim_pooling="foo"))
    with pytest.raises(ValueError, match="--num_query_tokens 4 but .* was trained with 8 queries"):
        train_pretrain.main(_pretrain(saved, sources, model_name_or_path=str(saved["ckpt"]), num_query_tokens=4))
    with pytest.raises(ValueError, match="--max_length 4096 exceeds the LLM's 512 positions"):
        train_dialogue.main(_dialogue(saved, "--train_file", str(saved["train"]), "--max_length", "4096"))
    with pytest.raises(ValueError, match="--max_new_tokens 600 leaves no room"):
        eval_dialogue.main(_eval(saved, "--max_new_tokens", "600"))


def test_prompt_plus_new_tokens_beyond_the_positions_is_fitted_with_a_warning(build_tiny):
    model, processor = build_tiny("llama")
    assert processor.max_length == 512 and model.config.text_config.max_position_embeddings == 512
    with CaptureLogger(logging.get_logger("vikdf.checks")) as captured:
        fit_generation_length(model.config, processor, 32)
    assert "exceed the LLM's 512 positions; contexts are truncated to 480" in captured.out
    assert processor.max_length == 480
    prompt = processor(text=[["word " * 600, "latest"]])["input_ids"]
    assert prompt.shape[1] + 32 <= 512


def test_continuing_pretraining_applies_the_tim_pooling_flag(saved, pair_world, tmp_path):
    trainer = train_pretrain.main(pretrain_argv(
        saved["components"], "wds:" + pair_world.train_shards, tmp_path, max_steps=1, save_strategy="no",
        model_name_or_path=str(saved["ckpt"]), tim_pooling="max",
    ))
    assert trainer.model.config.tim_pooling == "max" and trainer.model.config.num_query_tokens == 8
    assert json.loads((tmp_path / "config.json").read_text())["tim_pooling"] == "max"


# -------------------------------------------------------------------------------------------------- 4. raw crashes
def test_non_positive_query_counts_are_refused(saved, no_model_load, pair_world):
    with pytest.raises(ValueError, match="num_query_tokens=0; it must be a positive"):
        tiny_vikdf_config(num_query_tokens=0)
    for value in ("0", "-3"):
        with pytest.raises(ValueError, match=f"--num_query_tokens {value}: the number of queries must be positive"):
            train_pretrain.main(_pretrain(saved, "wds:" + pair_world.train_shards, num_query_tokens=value))


def test_config_overrides_name_the_flag_and_the_valid_keys(saved, no_model_load, pair_world):
    sources = "wds:" + pair_world.train_shards
    with pytest.raises(ValueError, match="--config_overrides is not valid JSON"):
        train_pretrain.main(_pretrain(saved, sources, config_overrides="{loss_weight_tim: 0.5}"))
    with pytest.raises(ValueError, match="unknown config field.* loss_weight_tm; valid fields: .*loss_weight_tim"):
        train_pretrain.main(_pretrain(saved, sources, config_overrides='{"loss_weight_tm": 0.5}'))


def test_a_truncated_weights_file_is_named(saved, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved["ckpt"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=r"broken/model.safetensors is damaged or truncated"):
        load_checkpoint(broken)
    with pytest.raises(OSError, match=r"broken/model.safetensors is damaged or truncated"):
        VIKDFForConditionalGeneration.from_pretrained(broken)
    with pytest.raises(OSError, match=r"model.safetensors is damaged or truncated"):
        eval_dialogue.main(["--model_name_or_path", str(broken), "--test_file", str(saved["train"])])


# ----------------------------------------------------------------------------------------------- 5. smaller defects
def test_lora_with_fraction_zero_is_refused(saved, no_model_load):
    with pytest.raises(ValueError, match="--method lora with --train_fraction 0 trains no adapters.*--baseline llm"):
        train_dialogue.main(_dialogue(saved, "--method", "lora", "--train_fraction", "0"))


def test_bad_record_hint_names_the_command_line_flag(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"context": [], "response": "x"}]))
    with pytest.raises(ValueError, match="--skip_bad_records"):
        load_dialogues(path)


def test_an_empty_json_list_says_so(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="empty.json: the JSON list is empty; the file holds no dialogues"):
        load_dialogues(path)


def test_train_pretrain_info_lines_print_with_log_level_info():
    previous = logging.get_verbosity()
    try:
        logging.set_verbosity(pylogging.INFO)  # what --log_level info makes main() do
        assert train_pretrain.logger.isEnabledFor(pylogging.INFO)
        with CaptureLogger(logging.get_logger("transformers")) as captured:
            train_pretrain.logger.info("Objectives: tim")
        assert "Objectives: tim" in captured.out  # reaches the handler transformers' logging configures
    finally:
        logging.set_verbosity(previous)


def test_context_truncation_fills_max_length_exactly_without_the_indexing_warning(build_tiny):
    _, processor = build_tiny("llama")
    processor.max_length = 96
    words = ["dog", "park,", "sky!", "a", "restaurant?", "bananas", "xyz", "qq"]
    contexts = [[" ".join(words[(i + k) % len(words)] for k in range(400 + i)), "final question?"] for i in range(12)]
    with CaptureLogger(logging.get_logger("transformers.tokenization_utils_base")) as captured:
        batch = processor.dialogue_inputs(contexts, ["an answer"] * len(contexts))
    assert "indexing errors" not in captured.out
    assert batch["attention_mask"].sum(-1).tolist() == [96] * len(contexts)
    prompt_only = processor.dialogue_inputs(contexts)
    assert prompt_only["attention_mask"].sum(-1).tolist() == [96] * len(contexts)
    for row in prompt_only["input_ids"]:
        assert processor.tokenizer.decode(row).rstrip().endswith("final question? [/INST]")


def test_max_response_length_gives_prompt_and_response_the_releases_separate_budgets(build_tiny):
    # The release cuts the LLM input at 128 tokens and the response at 32, each on its own: a short response does not
    # lend its room to the context, and a long one is cut to its budget.
    _, processor = build_tiny("llama")
    processor.max_length, processor.max_response_length = 96, 16
    context = [" ".join(["dog", "park,", "sky!"] * 200), "final question?"]
    short, long = "an answer", " ".join(["word"] * 60)
    batch = processor.dialogue_inputs([context, context], [short, long])
    labels = batch["labels"]
    prompt_lengths = (labels == -100).logical_and(batch["attention_mask"].bool()).sum(-1).tolist()
    assert prompt_lengths == [96 - 16, 96 - 16]
    assert (labels[1] != -100).sum().item() == 16
    assert (labels[0] != -100).sum().item() == len(processor.dialogue_response_ids(short))
    processor.max_response_length = None  # the default: the response takes what it needs, the prompt the rest
    assert processor.dialogue_inputs([context], [short])["attention_mask"].sum().item() == 96
