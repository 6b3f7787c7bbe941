"""Training arguments shared by the entry points: `TrainingArguments` with the paper's defaults and a precision
switch that picks bf16 on GPUs that have it and fp32 elsewhere (paper §4.2 trains in bf16)."""

import os
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property

import torch
from accelerate import PartialState
from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy

from vikdf.checks import check_positive
from vikdf.defaults import PRECISIONS, DialogueSchedule, PretrainSchedule, TrainingFlags


def resolve_dtype(precision: str) -> torch.dtype:
    """The dtype of frozen towers and the LLM: bf16 on a GPU that supports it under "auto", else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {PRECISIONS}.")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class VIKDFTrainingArguments(TrainingFlags, TrainingArguments):
    """`TrainingArguments` with `--precision` and `--save_full_model`."""

    def __post_init__(self):
        # Refused at parsing, before any model loads: transformers' own arguments accept 0.
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_positive(getattr(self, name), f"--{name}")
        # These strategies upload checkpoint folders as they are, and a trainable-only checkpoint is no model
        # (vikdf.training.trainable_checkpoints).
        strategy = HubStrategy(self.hub_strategy)
        uploads_checkpoints = strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS)
        if self.push_to_hub and uploads_checkpoints and not self.save_full_model:
            raise ValueError(
                f"--hub_strategy {strategy.value} uploads checkpoint folders to the Hub, and a checkpoint holds only "
                "the trainable parameters unless --save_full_model: add --save_full_model, or use --hub_strategy "
                "every_save or end (the final model, whole, is pushed either way)."
            )
        self.bf16 = self.bf16 or resolve_dtype(self.precision) == torch.bfloat16
        # Decided here, where it is still known whether the user gave an accelerator config; started in
        # `_setup_devices`, so that parsing the arguments starts no process group of ours.
        self._starts_deepspeed_state = bool(
            self.deepspeed and self.ddp_backend and "LOCAL_RANK" in os.environ and self.accelerator_config is None
        )
        if self._starts_deepspeed_state:
            self.accelerator_config = {"use_configured_state": True}  # else TrainingArguments resets that state
        super().__post_init__()

    @cached_property
    def _setup_devices(self) -> torch.device:
        """TrainingArguments' device setup, in the shared state `_start_deepspeed_processes` starts where needed."""
        if self._starts_deepspeed_state:
            _start_deepspeed_processes(self.ddp_backend, self.ddp_timeout)
        return super()._setup_devices


def _start_deepspeed_processes(backend: str, timeout: int) -> None:
    """Join the `deepspeed` launcher's processes with `--ddp_backend`: on that path transformers hands accelerate no
    backend, and accelerate finds none on CPU (gloo), so each process would train alone. The shared state started
    here is the one TrainingArguments' device setup then uses (`use_configured_state`)."""
    set_here = "ACCELERATE_USE_DEEPSPEED" not in os.environ
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    try:
        PartialState(backend=backend, timeout=timedelta(seconds=timeout))
    finally:
        if set_here:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]


@dataclass
class PretrainTrainingArguments(PretrainSchedule, VIKDFTrainingArguments):
    """`TrainingArguments` with the paper's pre-training schedule (`vikdf.defaults.PretrainSchedule`) and what
    `VIKDFPretrainTrainer` needs of the Trainer: the collator's keys reach the model whole, and an evaluation scores
    the objectives' losses only."""

    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Drop batch keys forward() does not name (off: the pre-training forward and "
                                         "its losses read every key of the collator's batch)."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluate the losses only (the pre-training model has no predictions)."}
    )
    label_names: list[str] | None = field(
        default_factory=lambda: ["llm_labels"], metadata={"help": "The batch keys that hold labels."}
    )

    def __post_init__(self):
        # The pairs stream with no epochs, so the steps are the whole schedule; the Trainer would refuse 0 only after
        # the towers have loaded.
        check_positive(self.max_steps, "--max_steps")
        super().__post_init__()


@dataclass
class DialogueTrainingArguments(DialogueSchedule, VIKDFTrainingArguments):
    """`TrainingArguments` with the dialogue fine-tuning defaults (`vikdf.defaults.DialogueSchedule`)."""

    def __post_init__(self):
        # Without --max_steps the epochs are the schedule, and none would train nothing and still save a "fine-tuned"
        # checkpoint (--train_fraction 0 is the flag that asks for that).
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"--num_train_epochs {self.num_train_epochs} must be above 0 (or give --max_steps); "
                             "to re-save a checkpoint without training, use --train_fraction 0.")
        super().__post_init__()
