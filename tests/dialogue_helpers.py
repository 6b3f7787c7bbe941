"""Shared pieces of the tests that checkpoint `train_dialogue.py` runs: four dialogues and a saved tiny VIKDF to
fine-tune, and the arguments of an 8-step run (batch 2, 4 epochs) that checkpoints after steps 3, 6 and 8."""

import json
from pathlib import Path

DIALOGUES = [
    (["what did you do this weekend?"], "i went hiking in the mountains."),
    (["a dog in the park", "is it playing?"], "yes, with a red ball."),
    (["the cat sleeps on a blue sofa"], "that sounds great, i love cats."),
    (["i think the weather will be sunny tomorrow"], "let's go to the beach!"),
]


def write_dialogue_world(root: Path, save_tiny_vikdf) -> dict:
    """`root/pretrained` (a tiny VIKDF as train_pretrain.py leaves one) and `root/train.json` (the dialogues)."""
    save_tiny_vikdf(root / "pretrained")
    train = root / "train.json"
    train.write_text(json.dumps([{"context": c, "response": r} for c, r in DIALOGUES]))
    return {"root": root, "pretrained": root / "pretrained", "train": train}


def dialogue_argv(world: dict, output_dir, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(world["pretrained"]), "--train_file", str(world["train"]),
        "--output_dir", str(output_dir), "--num_train_epochs", "4", "--per_device_train_batch_size", "2",
        "--learning_rate", "3e-3", "--warmup_steps", "0", "--save_strategy", "steps", "--save_steps", "3",
        "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0", *extra,
    ]  # fmt: skip
