"""Training arguments shared by the entry points: `TrainingArguments` with the paper's defaults and a precision
switch that picks bf16 on GPUs that have it and fp32 elsewhere (paper §4.2 trains in bf16)."""

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from accelerate import PartialState
from transformers import TrainingArguments

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_dtype(precision: str) -> torch.dtype:
    """The dtype of frozen towers and the LLM: bf16 on a GPU that supports it under "auto", else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {PRECISIONS}.")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class VIKDFTrainingArguments(TrainingArguments):
    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on a GPU that supports it, fp32 on CPU), bf16 or fp32. Sets --bf16 for you."},
    )

    def __post_init__(self):
        self.bf16 = self.bf16 or resolve_dtype(self.precision) == torch.bfloat16
        if self.deepspeed and self.ddp_backend and "LOCAL_RANK" in os.environ and self.accelerator_config is None:
            _start_deepspeed_processes(self.ddp_backend, self.ddp_timeout)
            self.accelerator_config = {"use_configured_state": True}  # else TrainingArguments resets it
        super().__post_init__()


def _start_deepspeed_processes(backend: str, timeout: int) -> None:
    """Join the `deepspeed` launcher's processes with `--ddp_backend`: on that path transformers hands accelerate no
    backend, and accelerate finds none on CPU (gloo), so each process would train alone. The shared state started
    here is the one TrainingArguments then uses."""
    set_here = "ACCELERATE_USE_DEEPSPEED" not in os.environ
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    try:
        PartialState(backend=backend, timeout=timedelta(seconds=timeout))
    finally:
        if set_here:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]


@dataclass
class PretrainTrainingArguments(VIKDFTrainingArguments):
    """Paper §4.2: 4 GPUs × 32 = global batch 128, 100k steps, AdamW lr 1e-4, weight decay 0.05, 10 % linear warm-up
    (then constant, as released)."""

    per_device_train_batch_size: int = field(default=32, metadata={"help": "Micro-batch per device (paper: 4 × 32)."})
    max_steps: int = field(default=100_000, metadata={"help": "Training steps (paper: 100k)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (paper: 1e-4)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (paper: 0.05)."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Linear warm-up: steps, or a ratio < 1 (paper: 0.1)."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup",
        metadata={
            "help": "Schedule: linear warm-up (a tenth of the steps, as in the paper), then constant, as the release's scripts/run_train.sh "
            "asked for (`linear` decays to 0 instead). The release's DeepSpeed config (ds_config_zero1.json) replaced "
            "even that with DeepSpeed's WarmupLR: a logarithmic warm-up over the same steps, then constant. Our "
            "ds_configs/ have no scheduler block, so this flag holds under DeepSpeed too."
        },
    )
    save_steps: float = field(default=5000, metadata={"help": "Checkpoint every N steps."})
    logging_steps: float = field(default=50, metadata={"help": "Log the five objectives every N steps."})


@dataclass
class DialogueTrainingArguments(VIKDFTrainingArguments):
    """Dialogue fine-tuning defaults (the paper gives none beyond pre-training's optimiser)."""

    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch per device."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the (fraction of the) dialogue set."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Linear warm-up: steps, or a ratio < 1."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint."})
