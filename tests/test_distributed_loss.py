"""Two gloo processes log the loss and gradient norm of one process on the same global batch, for both trainers.

transformers sums `num_items_in_batch` over ranks (`average_tokens_across_devices`), so a rank's loss is its local
sum over the global count; DDP then averages the ranks' gradients. Only with the factor world_size that
`Trainer.compute_loss` applies do the loss, the gradient and the clipping threshold match one process. At lr 0
every step sees the same weights, so each step's logged loss and grad_norm can be compared directly.
"""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pretrain_helpers import disable_dropout, free_port, load_pairs, slice_batch

from conftest import TINY_OVERRIDES
from modeling_vikdf import VIKDFForConditionalGeneration
from processing_vikdf import VIKDFProcessor
from vikdf.training.arguments import DialogueTrainingArguments, PretrainTrainingArguments
from vikdf.training.components import build_vikdf_from_components
from vikdf.data.collators import DialogueCollator, PretrainCollator
from vikdf.data.dialogue import Dialogue
from vikdf.training.trainers import VIKDFDialogueTrainer, VIKDFPretrainTrainer

WORLD_SIZE = 2
GLOBAL_BATCH = 4
STEPS = 2
DIALOGUES = [
    Dialogue(("what did you do this weekend?",), "i went hiking in the mountains."),
    Dialogue(("a dog in the park", "is it playing?"), "yes, with a red ball."),
    Dialogue(("the cat sleeps on a blue sofa",), "that sounds great, i love cats and dogs."),
    Dialogue(("i think the weather will be sunny tomorrow",), "let's go!"),
    Dialogue(("two people are sitting at a table", "in a restaurant"), "what are they eating?"),
    Dialogue(("a man riding a bike down a busy city street",), "that looks dangerous to me."),
    Dialogue(("a bowl of fruit on a wooden table",), "apples."),
    Dialogue(("i love the view from the top",), "me too, it is beautiful up there."),
]


def _arguments(cls, output_dir, per_device: int, accumulation: int, **overrides):
    return cls(
        output_dir=str(output_dir), per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        learning_rate=0.0, max_steps=STEPS, logging_steps=1, save_strategy="no", warmup_steps=0, precision="fp32",
        report_to="none", disable_tqdm=True, dataloader_pin_memory=False, use_cpu=True,
        # gloo in the spawned ranks (a CPU machine has no default backend); none in the one-process reference.
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        train_sampling_strategy="sequential",  # the ranks' shares of a step then make up the one-process batch
        **overrides,
    )


def _load(folder: str):
    model = VIKDFForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return disable_dropout(model), VIKDFProcessor.from_pretrained(folder)


def _logged(trainer) -> list[dict]:
    history = trainer.state.log_history
    return [{key: entry[key] for key in ("loss", "grad_norm")} for entry in history if "loss" in entry]


def dialogue_run(folder: str, output_dir, per_device: int, accumulation: int) -> list[dict]:
    model, processor = _load(folder)
    model.drop_pretraining_heads()
    model.set_trainable_stage("dialogue")
    trainer = VIKDFDialogueTrainer(
        model=model, args=_arguments(DialogueTrainingArguments, output_dir, per_device, accumulation),
        train_dataset=DIALOGUES, data_collator=DialogueCollator(processor), processing_class=processor,
    )
    trainer.train()
    return _logged(trainer)


def pretrain_run(folder: str, output_dir, per_device: int, accumulation: int) -> list[dict]:
    model, processor = _load(folder)
    model.set_trainable_stage("pretrain")
    batch = torch.load(os.path.join(folder, "batch.pt"))

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        assert indices == list(range(indices[0], indices[-1] + 1)), indices
        return slice_batch(batch, indices[0], indices[-1] + 1)

    arguments = _arguments(PretrainTrainingArguments, output_dir, per_device, accumulation)
    trainer = VIKDFPretrainTrainer(
        model=model, args=arguments,
        train_dataset=list(range(GLOBAL_BATCH)), data_collator=collate, processing_class=processor,
    )
    trainer.train()
    return _logged(trainer)


# name: (run, per-process batch, accumulation); each gives the global batch GLOBAL_BATCH over WORLD_SIZE ranks.
DISTRIBUTED_RUNS = {
    "dialogue": (dialogue_run, GLOBAL_BATCH // WORLD_SIZE, 1),
    "dialogue_accumulated": (dialogue_run, 1, GLOBAL_BATCH // WORLD_SIZE),
    "pretrain": (pretrain_run, GLOBAL_BATCH // WORLD_SIZE, 1),
}


def rank_worker(rank: int, port: int, folder: str, out_dir: str, runs: dict) -> None:
    """One rank of WORLD_SIZE: each of `runs` (name: (run, per-process batch, accumulation)), saved in rank<r>.pt."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        results = {
            name: run(folder, os.path.join(out_dir, f"{name}-{rank}"), per_device, accumulation)
            for name, (run, per_device, accumulation) in runs.items()
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Results are on disk. Under load, a rank sometimes aborted in interpreter finalisation ("terminate called without
    # an active exception": a C++ thread still joinable while torch's globals are destroyed) after everything had
    # finished; leaving without finalisation turns that teardown race into the clean exit it is. Failures above
    # still raise and reach mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def checkpoint(tiny_components, pair_world, tmp_path_factory) -> str:
    """A tiny pre-training checkpoint and one collated global batch of pairs (its masks drawn once)."""
    folder = tmp_path_factory.mktemp("distributed_loss") / "checkpoint"
    paths = tiny_components("llama")
    torch.manual_seed(0)
    model, processor = build_vikdf_from_components(str(paths.clip), str(paths.bert), str(paths.llm), **TINY_OVERRIDES)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.save(PretrainCollator(processor, model.config)(load_pairs(pair_world, GLOBAL_BATCH)), folder / "batch.pt")
    return str(folder)


@pytest.fixture(scope="module")
def two_processes(checkpoint) -> dict[str, list[dict]]:
    out_dir = os.path.join(os.path.dirname(checkpoint), "ranks")
    os.makedirs(out_dir)
    mp.spawn(rank_worker, args=(free_port(), checkpoint, out_dir, DISTRIBUTED_RUNS), nprocs=WORLD_SIZE, join=True)
    return torch.load(os.path.join(out_dir, "rank0.pt"))


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("one_process")
    return {
        "dialogue": dialogue_run(checkpoint, out / "dialogue", GLOBAL_BATCH, 1),
        "pretrain": pretrain_run(checkpoint, out / "pretrain", GLOBAL_BATCH, 1),
    }


def _assert_same_logs(logs: list[dict], reference: list[dict]) -> None:
    assert len(logs) == len(reference) == STEPS
    for step, (entry, expected) in enumerate(zip(logs, reference, strict=True), start=1):
        assert expected["loss"] > 0 and expected["grad_norm"] > 0, expected
        assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-5), (step, entry, expected)
        assert entry["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), (step, entry, expected)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("name", "reference"), [
    ("dialogue", "dialogue"), ("dialogue_accumulated", "dialogue"), ("pretrain", "pretrain"),
])
def test_two_processes_log_the_loss_and_grad_norm_of_one_on_the_same_global_batch(
    two_processes, one_process, name, reference
):
    _assert_same_logs(two_processes[name], one_process[reference])


def test_dialogue_loss_does_not_grow_with_gradient_accumulation(checkpoint, one_process, tmp_path):
    accumulated = dialogue_run(checkpoint, tmp_path, GLOBAL_BATCH // 2, 2)
    _assert_same_logs(accumulated, one_process["dialogue"])
