"""Shared pieces of the pre-training tests: tiny `train_pretrain.py` arguments, dropout switched off, a callback
that captures gradients just before the optimizer step, batch slicing and a free port for multi-process runs.
The synthetic pair world is conftest's `pair_world`."""

import json
import socket
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from vikdf.demo.world import iter_shard_pairs
from vikdf.testing import TINY_HEADS

# Top-level parts that only one objective trains (the ablation switches of Table 3 remove them from the loss).
HEAD_PARTS = {
    "use_tim": ("tim_text_projection", "tim_image_projection", "logit_scale"),
    "use_tamim": ("tamim_block", "tamim_decoder"),
    "use_iamtm": ("iamtm_block", "iamtm_head"),
    "use_bvif": ("iakr_head",),
}
SWITCH_OBJECTIVE = {"use_tim": "tim", "use_tamim": "tamim", "use_iamtm": "iamtm", "use_bvif": "iakr"}


def pretrain_argv(components, train_sources: str, output_dir, **options) -> list[str]:
    """Command-line arguments of `train_pretrain.py` for the tiny components; `options` add or override flags."""
    arguments = {
        "clip_model": components.clip,
        "bert_model": components.bert,
        "llm_model": components.llm,
        "num_query_tokens": 8,
        "config_overrides": json.dumps(TINY_HEADS),
        "train_sources": train_sources,
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "shuffle_buffer": 10,
        "precision": "fp32",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
    }
    arguments.update(options)
    argv = []
    for name, value in arguments.items():
        argv += [f"--{name}", str(value)]
    return argv


def mixed_source_specs(world, root: Path, count: int = 8) -> str:
    """`--train_sources` mixing all three kinds: the world's shards (`wds:`), and two more sets of `count` of its
    pairs written as COCO captions (`coco:`) and as an imagefolder read by `datasets` in streaming mode (`hf:`)."""
    pairs = load_pairs(world, 2 * count)
    coco, folder = root / "coco", root / "folder"
    (coco / "images").mkdir(parents=True)
    folder.mkdir(parents=True)
    images, annotations, rows = [], [], []
    for i, pair in enumerate(pairs[:count]):
        pair["image"].save(coco / "images" / f"{i:012d}.png")
        images.append({"id": i, "file_name": f"{i:012d}.png"})
        annotations.append({"id": 100 + i, "image_id": i, "caption": pair["caption"]})
    (coco / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    for i, pair in enumerate(pairs[count:]):
        pair["image"].save(folder / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": pair["caption"]}) + "\n")
    (folder / "metadata.jsonl").write_text("".join(rows))
    return f"wds:{world.train_shards};coco:{coco / 'captions.json'}:{coco / 'images'};hf:imagefolder:{folder}:image:text"


def set_dropout(model: nn.Module, p: float) -> nn.Module:
    """Dropout probability `p` everywhere in `model`: `nn.Dropout` modules and functional attention dropout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, p)
    return model


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere, train mode kept."""
    return set_dropout(model, 0.0)


def slice_batch(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Images start..stop of a collated batch: their CLIP rows, IACI rows and (with BVIF) IAKR rows."""
    images = batch["pixel_values"].shape[0]
    rows_per_image = batch["llm_input_ids"].shape[0] // images
    llm_rows = torch.cat([torch.arange(start, stop) + r * images for r in range(rows_per_image)])
    return {key: value[llm_rows] if key.startswith("llm_") else value[start:stop] for key, value in batch.items()}


def free_port() -> int:
    """A TCP port nobody listens on now, for a multi-process run's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_pairs(world, limit: int | None = None) -> list[dict]:
    """The world's training pairs as `{"image": PIL, "caption": str}` examples, in shard order."""
    pairs = [{"image": image, "caption": caption} for _, image, caption in iter_shard_pairs(world.train_shard_files)]
    return pairs[:limit]


class CaptureGradients(TrainerCallback):
    """Copies every trainable parameter's `.grad` (None stays None) just before each optimizer step."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.steps: list[dict[str, torch.Tensor | None]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({
            name: None if p.grad is None else p.grad.detach().clone()
            for name, p in self.model.named_parameters()
            if p.requires_grad
        })
