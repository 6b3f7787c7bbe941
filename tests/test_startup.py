"""What starting an entry point costs: `--help` without torch, and no metrics, plotting or DeepSpeed stack imported
before it is used (benchmarks/bench_startup.py times both)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser

import demo
import eval_dialogue
import train_dialogue
import train_pretrain
from vikdf.training.arguments import DialogueTrainingArguments, PretrainTrainingArguments
from vikdf.training.quantization import LLMQuantizationArguments

ROOT = Path(__file__).resolve().parents[1]
# Imported only where used. scipy itself is not listed: transformers imports scipy.optimize (for its object-detection
# losses) whenever scipy is installed, before any line of ours runs; our t-tests import scipy.stats when they run.
LAZY = ("deepspeed", "matplotlib", "pycocoevalcap", "evaluate", "nltk", "scipy.stats", "statsmodels")


def fresh_process(code: str) -> dict:
    """`code` run in a new interpreter at the repository root; it leaves its answer in the variable `result`."""
    script = f"import json, sys\n{code}\nprint(json.dumps(result))"
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "entry_point, flags",
    [
        ("train_pretrain", ("--train_sources", "--use_tim", "--learning_rate", "--precision", "--help_all",
                            "--llm_quantization", "--save_full_model")),
        ("train_dialogue", ("--train_file", "--preset", "--learning_rate", "--precision", "--help_all",
                            "--llm_quantization", "--save_full_model")),
        ("eval_dialogue", ("--test_file", "--knowledge_ablation", "--num_beams", "--llm_quantization")),
    ],
)
def test_help_lists_the_projects_flags_without_importing_torch(entry_point, flags):
    result = fresh_process(
        f"import contextlib, io, {entry_point}\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        {entry_point}.main(['--help'])\n"
        "    except SystemExit as stop:\n"
        "        code = stop.code\n"
        "result = {'code': code, 'help': out.getvalue(), 'torch': 'torch' in sys.modules}"
    )
    assert result["code"] == 0 and not result["torch"]
    for flag in flags:
        assert flag in result["help"]
    if entry_point == "train_pretrain":
        assert "(default: 0.0001)" in " ".join(result["help"].split())  # the paper's learning rate, not the Trainer's


@pytest.mark.parametrize("entry_point", [train_pretrain, train_dialogue])
def test_help_all_lists_every_trainer_flag(entry_point, capsys):
    with pytest.raises(SystemExit) as stop:
        entry_point.main(["--help_all"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--gradient_accumulation_steps" in text and "--output_dir" in text and "--help_all" not in text


@pytest.mark.parametrize(
    "dataclass_types",
    [
        (train_pretrain.PretrainModelArguments, train_pretrain.PretrainDataArguments, LLMQuantizationArguments,
         PretrainTrainingArguments),
        (train_dialogue.DialogueModelArguments, train_dialogue.DialogueDataArguments, LLMQuantizationArguments,
         DialogueTrainingArguments),
        (eval_dialogue.EvalArguments, LLMQuantizationArguments),
        (demo.DemoArguments,),
    ],
    ids=["train_pretrain", "train_dialogue", "eval_dialogue", "demo"],
)
def test_every_full_help_text_formats(dataclass_types):
    # argparse %-formats help texts: a bare "%" in one made --help crash.
    assert "--" in HfArgumentParser(dataclass_types).format_help()


def test_importing_the_model_and_the_entry_points_leaves_the_heavy_stacks_unimported():
    result = fresh_process(
        "import modeling_vikdf, processing_vikdf, pipeline_vikdf, train_pretrain, train_dialogue, eval_dialogue, demo\n"
        f"result = [name for name in {LAZY!r} if name in sys.modules]"
    )
    assert result == []


def test_loading_a_processor_never_stops_to_ask_about_remote_code(save_tiny_vikdf, tmp_path):
    # AutoTokenizer reads the checkpoint's config: an unregistered `vikdf` type made it prompt "[y/N]" and wait.
    folder = str(save_tiny_vikdf(tmp_path / "checkpoint"))
    completed = subprocess.run(
        [sys.executable, "-c", f"from processing_vikdf import VIKDFProcessor\nVIKDFProcessor.from_pretrained({folder!r})"],
        cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "custom code" not in completed.stdout + completed.stderr
