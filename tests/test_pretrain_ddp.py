"""Plain DDP pre-training (two gloo processes, no DeepSpeed, the Trainer's default search for unused parameters)
trains exactly as one process on the same global batch: the logged losses and the trained weights after two steps.

The whole pre-training step is the model's forward, so DDP sees every trained part used in it; when the towers and
heads ran outside that forward, DDP marked their parameters ready before their gradients came ("iakr_head.bias marked
ready twice").
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
from pretrain_helpers import disable_dropout, free_port, slice_batch, trainable_state
# The same tiny checkpoint and global batch, and the same rank set-up, as the loss-logging test.
from test_distributed_loss import GLOBAL_BATCH, STEPS, WORLD_SIZE, checkpoint, rank_worker  # noqa: F401

from modeling_vikdf import VIKDFForConditionalGeneration
from processing_vikdf import VIKDFProcessor
from vikdf.training.arguments import PretrainTrainingArguments
from vikdf.training.trainers import LOGGED_LOSSES, VIKDFPretrainTrainer

LEARNING_RATE = 0.1


def pretrain_run(folder: str, output_dir: str, per_device: int, accumulation: int = 1) -> dict:
    """Two SGD steps over the stored batch; the logged losses and the trained weights after them."""
    model = disable_dropout(VIKDFForConditionalGeneration.from_pretrained(folder, dtype=torch.float32))
    batch = torch.load(os.path.join(folder, "batch.pt"))

    def collate(indices: list[int]) -> dict[str, torch.Tensor]:
        return slice_batch(batch, indices[0], indices[-1] + 1)

    arguments = PretrainTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        learning_rate=LEARNING_RATE, max_steps=STEPS,
        # SGD: a weight moves by lr × its gradient, so the weights compare the gradients. Adam moves every weight by
        # about lr whatever its gradient's size, and turns rounding in a gradient near 0 into a visible move.
        optim="sgd",
        logging_steps=1, save_strategy="no", warmup_steps=0, precision="fp32", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False, use_cpu=True, train_sampling_strategy="sequential",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer = VIKDFPretrainTrainer(
        model=model, args=arguments, train_dataset=list(range(GLOBAL_BATCH)), data_collator=collate,
        processing_class=VIKDFProcessor.from_pretrained(folder),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {"logs": logs, "weights": trainable_state(model)}


@pytest.mark.timeout(300)
def test_two_ddp_processes_train_as_one_on_the_same_global_batch(checkpoint, tmp_path):
    single = pretrain_run(checkpoint, str(tmp_path / "single"), GLOBAL_BATCH)
    runs = {"pretrain": (pretrain_run, GLOBAL_BATCH // WORLD_SIZE, 1)}
    mp.spawn(rank_worker, args=(free_port(), checkpoint, str(tmp_path), runs), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt")["pretrain"] for rank in range(WORLD_SIZE)]

    assert len(single["logs"]) == len(ranks[0]["logs"]) == STEPS
    for step, (entry, expected) in enumerate(zip(ranks[0]["logs"], single["logs"], strict=True), start=1):
        assert set(LOGGED_LOSSES) <= entry.keys()
        assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-5), (step, entry, expected)
        assert entry["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), (step, entry, expected)
    for rank in ranks:
        assert rank["weights"].keys() == single["weights"].keys()
        for name, weight in single["weights"].items():
            torch.testing.assert_close(
                rank["weights"][name], weight, rtol=1e-4, atol=1e-6, msg=lambda message: f"{name}: {message}"
            )
    # Not trivially so: two steps moved every trained part.
    start = trainable_state(VIKDFForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32))
    moved = {name.split(".")[0] for name, weight in single["weights"].items() if not torch.equal(weight, start[name])}
    assert moved == {name.split(".")[0] for name in start}
