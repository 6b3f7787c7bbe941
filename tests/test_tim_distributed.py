"""TIM with negatives gathered across two real processes (gloo) equals TIM on the concatenated batch."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vikdf.training.losses import gather_across_ranks, tim_loss

WORLD_SIZE = 2
PER_RANK = 3
LOGIT_SCALE = math.log(1 / 0.07)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of WORLD_SIZE × PER_RANK pairs, for 'first' pooling (B, T) and 'max' pooling (B, n, T) images."""
    generator = torch.Generator().manual_seed(seed)
    batch = WORLD_SIZE * PER_RANK
    return {
        "text": F.normalize(torch.randn(batch, 8, generator=generator), dim=-1),
        "image": F.normalize(torch.randn(batch, 8, generator=generator), dim=-1),
        "image_queries": F.normalize(torch.randn(batch, 4, 8, generator=generator), dim=-1),
    }


def _loss_and_grads(text, image, logit_scale_value):
    text = text.clone().requires_grad_(True)
    image = image.clone().requires_grad_(True)
    logit_scale = torch.tensor(logit_scale_value, requires_grad=True)
    loss = tim_loss(text, image, logit_scale)
    loss.backward()
    return {"loss": loss.detach(), "text": text.grad, "image": image.grad, "logit_scale": logit_scale.grad}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        inputs = _inputs()
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        gathered, offset = gather_across_ranks(inputs["text"][local])
        results = {
            "offset": offset,
            "gathered_text": gathered,
            "first": _loss_and_grads(inputs["text"][local], inputs["image"][local], LOGIT_SCALE),
            "max": _loss_and_grads(inputs["text"][local], inputs["image_queries"][local], LOGIT_SCALE),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tim_ranks")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_gather_concatenates_ranks_in_order(rank_results):
    inputs = _inputs()
    for rank, result in enumerate(rank_results):
        assert result["offset"] == rank * PER_RANK
        assert torch.equal(result["gathered_text"], inputs["text"])


@pytest.mark.parametrize("pooling, image_key", [("first", "image"), ("max", "image_queries")])
def test_two_ranks_equal_one_process_on_the_whole_batch(rank_results, pooling, image_key):
    inputs = _inputs()
    single = _loss_and_grads(inputs["text"], inputs[image_key], LOGIT_SCALE)
    per_rank = [result[pooling] for result in rank_results]

    # Each rank's loss is the mean over its own pairs, against every rank's negatives.
    losses = torch.stack([r["loss"] for r in per_rank])
    assert torch.allclose(losses.mean(), single["loss"], atol=1e-6)
    # Not trivially so: local-batch negatives would give a different, smaller loss.
    local_only = torch.stack([
        tim_loss(inputs["text"][s], inputs[image_key][s], torch.tensor(LOGIT_SCALE))
        for s in (slice(0, PER_RANK), slice(PER_RANK, 2 * PER_RANK))
    ]).mean()
    assert not torch.allclose(local_only, single["loss"], atol=1e-3)

    # DDP averages gradients over ranks. A rank's local embeddings get the gradient of every rank's loss (the
    # gather's backward sums it), so after averaging they carry the gradient of the mean loss = the single loss.
    for key in ("text", "image"):
        distributed = torch.cat([r[key] for r in per_rank]) / WORLD_SIZE
        assert torch.allclose(distributed, single[key], atol=1e-6), key
    # logit_scale is replicated: averaging its per-rank gradients gives the single-process gradient.
    averaged_scale = torch.stack([r["logit_scale"] for r in per_rank]).mean()
    assert torch.allclose(averaged_scale, single["logit_scale"], atol=1e-6)
