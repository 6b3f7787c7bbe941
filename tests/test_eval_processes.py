"""`accelerate launch --multi_gpu --num_processes 2 eval_dialogue.py` on CPU: the dialogues are split by batches
over the two processes, rank 0 gathers them and alone writes files and the model card, and everything equals a
1-process run. (Without a GPU, accelerate starts several processes only with --multi_gpu, i.e. through torchrun;
on a multi-GPU machine it picks that launcher itself.)"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import eval_dialogue
from vikdf.data.dialogue import load_dialogues
from vikdf.evaluation.dialogues import load_checkpoint, perplexities, rank_share, response_nll

REPO = Path(__file__).resolve().parents[1]
# 7 dialogues, batch 2: 4 single-process batches (the last of 1), 2 per rank.
TEST = [
    ["Curious", "the sky looks so big tonight", "i wonder what is up there."],
    ["Happy", "a dog playing in the park with a red ball", "it looks so happy!"],
    ["Calm", "a cat on the sofa", "sleeping all day long."],
    ["Bored", "an empty street in the rain", "nobody wants to go out."],
    ["Excited", "fireworks over the river at night", "what a show!"],
    ["Sad", "a broken umbrella", "it was my favourite one."],
    ["Hungry", "a bowl of fruit on a wooden table", "apples and bananas."],
]
OUTPUTS = ("predictions.jsonl", "metrics.json", "metrics.md", "knowledge.jsonl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(save_tiny_vikdf, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_processes")
    save_tiny_vikdf(root / "model")
    test_file = root / "image_chat" / "test.json"
    test_file.parent.mkdir()
    test_file.write_text(
        json.dumps([{"image_hash": f"{i:032x}", "dialog": [[s, a], ["Other", b]]} for i, (s, a, b) in enumerate(TEST)])
    )
    return root, test_file


def test_rank_shares_are_whole_batches_that_cover_the_test_set_once():
    contexts = [[f"{'word ' * length}"] for length in (3, 9, 1, 5, 7, 2, 8)]
    shares = [rank_share(contexts, 2, rank, 2) for rank in (0, 1)]
    single = rank_share(contexts, 2, 0, 1)
    assert single == [1, 6, 4, 3, 0, 5, 2]  # longest first
    assert shares == [single[0:2] + single[4:6], single[2:4] + single[6:]]


@pytest.mark.timeout(600)
def test_two_processes_give_the_files_and_card_of_one(checkpoint, tmp_path):
    root, test_file = checkpoint
    models = {n: tmp_path / f"model-{n}" for n in (1, 2)}
    for model in models.values():
        shutil.copytree(root / "model", model)

    def argv(n: int) -> list[str]:
        return [
            "--model_name_or_path", str(models[n]), "--test_file", str(test_file), "--output_dir", str(tmp_path / f"out-{n}"),
            "--batch_size", "2", "--max_new_tokens", "6", "--textualise", "2", "--precision", "fp32",
            "--disable_tqdm", "true",
        ]  # fmt: skip

    single = eval_dialogue.main(argv(1))
    # PPL from the per-dialogue NLLs is the PPL over the whole test set.
    model, processor = load_checkpoint(root / "model")
    dialogues = load_dialogues(test_file)
    contexts, references = [list(d.context) for d in dialogues], [d.response for d in dialogues]
    expected = perplexities(*response_nll(model, processor, contexts, references, batch_size=2))["ppl"]
    assert single["ppl"] == pytest.approx(expected, rel=1e-9)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "eval_dialogue.py", *argv(2),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    # Each process evaluated its share only.
    assert "Process 0 of 2: 4 of 7 dialogues" in log and "Process 1 of 2: 3 of 7 dialogues" in log
    for name in OUTPUTS:
        assert (tmp_path / "out-2" / name).read_text() == (tmp_path / "out-1" / name).read_text(), name
    assert json.loads((tmp_path / "out-2" / "metrics.json").read_text()) == single
    info = json.loads((tmp_path / "out-2" / "eval_info.json").read_text())
    assert info["num_processes"] == 2
    assert (models[2] / "README.md").read_text() == (models[1] / "README.md").read_text()
