"""Shared pieces of the pre-training tests: tiny `train_pretrain.py` arguments, a small synthetic pair world,
dropout switched off, and a callback that captures gradients just before the optimizer step.

Test modules wrap `shared_pair_world` in a fixture of their own; the world is written once per session.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from vikdf.data.synthetic import iter_shard_pairs, write_synthetic_world

# Fields of VIKDFConfig that make the heads fit the tiny components of `vikdf.testing`.
TINY_CONFIG_OVERRIDES = {
    "mask_patch_size": 8, "head_num_attention_heads": 4, "head_intermediate_size": 64, "tim_embed_dim": 16
}

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
        "config_overrides": json.dumps(TINY_CONFIG_OVERRIDES),
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


@contextmanager
def one_torch_thread():
    """Run torch ops on one thread. On a small shared machine (2 cores, other jobs running) torch's default of one
    OpenMP thread per core makes training steps 20-40x slower from threads spinning against each other; one thread
    costs ~20 % when the machine is idle."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


_SHARED: dict[str, object] = {}


def shared_pair_world(tmp_path_factory):
    """64 synthetic image–text pairs in two real webdataset shards (32 each), written once per test session."""
    if "pair_world" not in _SHARED:
        root: Path = tmp_path_factory.mktemp("pair_world")
        _SHARED["pair_world"] = write_synthetic_world(
            root, num_pairs=64, num_shards=2, num_heldout_pairs=4, num_dialogues=4, num_eval_dialogues=6
        )
    return _SHARED["pair_world"]
