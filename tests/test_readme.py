"""The README's two set-up commands, CI's use of them, and the paper-setting commands it documents (parsed by the entry
points' own argument parsers, so a renamed or removed flag fails here)."""

import re
import shlex
from pathlib import Path

import pytest
from transformers import HfArgumentParser

import demo
import eval_dialogue
import train_dialogue
import train_pretrain
from vikdf.arguments import DialogueTrainingArguments, PretrainTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def readme_invocations(script: str) -> list[list[str]]:
    """The arguments of every complete README command line that runs `script` (lines with "..." are abridged)."""
    found = []
    for block in bash_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if script in words and "..." not in words:
                found.append(words[words.index(script) + 1 :])
    return found


def test_setup_is_two_commands_install_and_demo_then_the_tests_that_ci_runs():
    setup = README.split("## Set-up", 1)[1]
    install_and_demo, test_command = bash_blocks(setup)[0].strip().splitlines()
    steps = [step.strip() for step in install_and_demo.split("&&")]
    assert steps[0].startswith("python3 -m venv ") and steps[1].startswith(". ") and steps[1].endswith("/bin/activate")
    assert steps[2] == 'pip install -e ".[dev]"' and steps[3] == "python demo.py"
    assert demo.DemoArguments().preset == "full"  # `python demo.py` runs the README's demo, not the smoke setting

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m venv" in ci and 'pip install --quiet -e ".[dev]"' in ci and "set -euo pipefail" in ci
    assert ci.strip().splitlines()[-1] == f"python -m {test_command}"


def test_paper_pretraining_command_parses_with_the_papers_towers_and_pair_sources():
    (argv,) = readme_invocations("train_pretrain.py")
    parser = HfArgumentParser(
        (train_pretrain.PretrainModelArguments, train_pretrain.PretrainDataArguments, PretrainTrainingArguments)
    )
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    assert model_args.clip_model == "openai/clip-vit-large-patch14"
    assert model_args.bert_model == "bert-base-uncased"
    assert model_args.llm_model == "meta-llama/Llama-2-7b-chat-hf"
    for source in ("coco=coco:", "cc3m", "cc12m", "sbu"):
        assert source in data_args.train_sources, source
    assert training_args.per_device_train_batch_size * 4 == 128 and training_args.max_steps == 100_000


@pytest.mark.parametrize(
    ("script", "dataclasses", "file_field", "dataset"),
    [
        ("train_dialogue.py", (train_dialogue.DialogueModelArguments, train_dialogue.DialogueDataArguments,
                               DialogueTrainingArguments), "train_file", "reddit/"),
        ("eval_dialogue.py", (eval_dialogue.EvalArguments,), "test_file", "image_chat/test.json"),
    ],
)
def test_paper_dialogue_commands_parse_with_reddit_and_image_chat(script, dataclasses, file_field, dataset):
    invocations = readme_invocations(script)
    assert invocations, f"the README shows no complete {script} command"
    for argv in invocations:
        parsed = HfArgumentParser(dataclasses).parse_args_into_dataclasses(args=argv)
        files = [getattr(args, file_field) for args in parsed if hasattr(args, file_field)]
        assert files and dataset in files[0], (argv, files)


def test_demo_to_paper_table_names_the_real_components_and_data():
    table = README.split("## From the demo to the paper's setting", 1)[1].split("\n## ", 1)[0]
    for name in ("openai/clip-vit-large-patch14", "bert-base-uncased", "meta-llama/Llama-2-7b-chat-hf", "COCO",
                 "CC3M", "CC12M", "SBU", "Reddit", "Image-Chat"):
        assert name in table, name
