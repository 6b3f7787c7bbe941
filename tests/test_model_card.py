"""The model card as the Hub reads it: model-index results, licence, bases, paper link, a snippet that runs."""

import json

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

import train_dialogue
from vikdf.evaluation.dialogues import EXTRA_COLUMNS, METRIC_KEYS, TABLE1_COLUMNS
from vikdf.evaluation.model_card import PAPER_URL, build_model_card, default_license, update_model_card_metrics
from vikdf.training.arguments import DialogueTrainingArguments

QUICK = ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.fixture(scope="module")
def zero_resource(tiny_components, save_tiny_vikdf, tmp_path_factory):
    """A zero-resource dialogue checkpoint written by train_dialogue.py from tiny local component folders."""
    root = tmp_path_factory.mktemp("card")
    paths = tiny_components("llama")
    save_tiny_vikdf(root / "pretrained")
    out = root / "zero"
    train_dialogue.main(["--model_name_or_path", str(root / "pretrained"), "--train_fraction", "0", "--output_dir",
                         str(out), "--license", "mit", *QUICK])
    return {"root": root, "out": out, "paths": paths}


def test_metrics_are_in_the_model_index(tmp_path):
    build_model_card(base_model="meta-llama/Llama-2-7b-chat-hf").save(tmp_path / "README.md")
    metrics = {key: float(i + 1) for i, key in enumerate(METRIC_KEYS)}
    update_model_card_metrics(tmp_path, {**metrics, "ppl": 99.0}, "image_chat/test.json")
    update_model_card_metrics(tmp_path, metrics, "image_chat/test.json")  # replaces the first run's results
    update_model_card_metrics(tmp_path, {**metrics, "embedding_average": None}, "reddit/test.json")
    results = ModelCard.load(tmp_path / "README.md").data.eval_results
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in results}
    assert found == {
        **{("image_chat/test.json", key): value for key, value in metrics.items()},
        **{("reddit/test.json", key): value for key, value in metrics.items() if key != "embedding_average"},
    }
    titles = {r.metric_type: r.metric_name for r in results}
    assert titles == {key: title for key, title in TABLE1_COLUMNS + EXTRA_COLUMNS}
    assert all(r.task_type == "text-generation" for r in results)


def test_a_fresh_card_written_with_metrics_has_them_in_the_model_index(tmp_path):
    update_model_card_metrics(tmp_path, {"ppl": 12.5, "bleu_1": 30.0}, "test.json")
    results = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert {(r.metric_type, r.metric_value) for r in results} == {("ppl", 12.5), ("bleu_1", 30.0)}


@pytest.mark.parametrize(
    "llm, license",
    [
        ("meta-llama/Llama-2-7b-chat-hf", "llama2"),
        ("Qwen/Qwen2.5-7B-Instruct", "apache-2.0"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "apache-2.0"),
        ("someone/unknown-llm", None),
    ],
)
def test_the_licence_defaults_to_the_base_llms(llm, license):
    assert default_license(llm) == license
    assert build_model_card(base_model=llm).data.license == license
    assert build_model_card(base_model=llm, license="mit").data.license == "mit"


def test_the_license_flag_reaches_the_card(zero_resource):
    assert ModelCard.load(zero_resource["out"] / "README.md").data.license == "mit"


def test_the_card_lists_the_bases_links_the_paper_and_holds_no_local_path(zero_resource):
    text = (zero_resource["out"] / "README.md").read_text()
    paths = zero_resource["paths"]
    for folder in (paths.clip, paths.bert, paths.llm):
        assert f"`{folder.name}` (a local folder)" in text
    assert "CLIP (frozen text tower)" in text and "BERT (initialises the IQ-Former)" in text
    assert f"]({PAPER_URL})" in text
    assert str(zero_resource["root"]) not in text and str(paths.llm.parent) not in text


def test_the_pipeline_snippet_and_tag_match_what_works(zero_resource, capsys):
    out = zero_resource["out"]
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag in json.loads((out / "config.json").read_text())["custom_pipelines"]
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert "pipeline(" in snippet
    exec(compile(snippet.replace("path/to/this/checkpoint", str(out)), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("{'generated_text': ") and "'knowledge': " in printed


def test_push_folder_does_not_upload_the_pickled_training_arguments(zero_resource, monkeypatch):
    out = zero_resource["out"]
    (out / "training_args.bin").write_bytes(b"pickle")
    uploads = {}

    class Repo:
        repo_id = "me/vikdf"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *args, **kwargs: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: uploads.update(kwargs))
    train_dialogue.push_folder(str(out), DialogueTrainingArguments(output_dir=str(out)), "test")
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=uploads["ignore_patterns"]))
    assert "training_args.bin" not in uploaded
    assert {"config.json", "model.safetensors", "README.md", "pipeline_vikdf.py"} <= uploaded
