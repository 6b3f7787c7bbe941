"""Checkpoints that hold what trains: `checkpoint-N/` with the trainable parameters, not the whole model.

VIKDF trains the IQ-Former side only (paper §3.4.1): at paper size 158.6M of 7.3B parameters, so a whole-model
checkpoint was 14.6 GB (bf16) of which 0.3 GB had changed. A checkpoint written during training now holds

- `trainable.safetensors`: every parameter with `requires_grad`, named as in the VIKDF model (for `--method lora`, the
  VIKDF model the adapters were injected into);
- `frozen_parts.json`: each frozen component's source and fingerprint (`vikdf.training.frozen_parts`);
- `config.json`, and, written by the Trainer as before, the optimizer, scheduler, RNG and pair-stream states.

Resuming rebuilds the frozen parts from their sources (the scripts do), refuses a component whose fingerprint
differs, then loads the trainable tensors. `--save_full_model` writes whole models as checkpoints instead, and a
checkpoint without `frozen_parts.json` (a full one, or one written before) resumes through the Trainer's own path.
The final save of a run is the whole model, loadable with `AutoModel`, as ever.

Under DeepSpeed the Trainer saves and resumes the module through DeepSpeed's own `global_step*/` files: these leave
the frozen parameters out too, and the resumed module load accepts their absence once the fingerprints matched.
Under ZeRO-3 (or FSDP) each process holds a shard of every parameter, so checkpoints stay whole models there.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import HubStrategy, SaveStrategy, get_last_checkpoint
from transformers.utils import CONFIG_NAME, logging

from vikdf.training.frozen_parts import (
    FROZEN_PARTS_NAME,
    check_frozen_parts,
    frozen_fingerprints,
    frozen_parts_record,
    vikdf_module,
    write_frozen_parts,
)

logger = logging.get_logger(__name__)

# Not `model.safetensors`: the Trainer's own loader would take it for a whole model.
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of `model` that train, named as in the VIKDF model (under a peft wrapper: with the adapters)."""
    return {name: p for name, p in vikdf_module(model).named_parameters() if p.requires_grad}


def is_trainable_checkpoint(folder: str | os.PathLike | None) -> bool:
    """A checkpoint that holds the trainable parameters only (it records its frozen parts)."""
    return folder is not None and (Path(folder) / FROZEN_PARTS_NAME).is_file()


def check_trainable_tensors(folder: str | os.PathLike, model: nn.Module) -> None:
    """Refuse a checkpoint whose trainable tensors are not exactly the ones `model` trains (names and shapes)."""
    path = Path(folder) / TRAINABLE_WEIGHTS_NAME
    parameters = trainable_parameters(model)
    with safe_open(str(path), framework="pt") as saved:
        shapes = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    missing, unexpected = sorted(parameters.keys() - shapes.keys()), sorted(shapes.keys() - parameters.keys())
    reshaped = sorted(n for n in shapes.keys() & parameters.keys() if shapes[n] != tuple(parameters[n].shape))
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not hold what this run trains: missing {missing[:5]}, not trained here {unexpected[:5]}, "
            f"of another shape {reshaped[:5]} (first 5 of each). Resume with the flags of the run that wrote it "
            "(the same stage, --method, --freeze_iq_former, --lora_* and model sizes), or start fresh."
        )


def load_trainable(model: nn.Module, folder: str | os.PathLike) -> None:
    """Copy the checkpoint's trainable tensors into `model` (checked with `check_trainable_tensors` first)."""
    parameters = trainable_parameters(model)
    with torch.no_grad():
        for name, tensor in load_file(Path(folder) / TRAINABLE_WEIGHTS_NAME, device="cpu").items():
            parameters[name].copy_(tensor)


class TrainableCheckpointMixin:
    """`Trainer` checkpoints holding the trainable parameters and the frozen parts' record (module docstring).

    `frozen_sources` maps each component to where the script built it from
    (`vikdf.training.frozen_parts.sources_from_*`).
    """

    def __init__(self, *args, frozen_sources: dict | None = None, **kwargs):
        self.frozen_sources = dict(frozen_sources or {})
        super().__init__(*args, **kwargs)

    @property
    def writes_trainable_checkpoints(self) -> bool:
        """Whether checkpoints hold the trainable parameters only: not with --save_full_model, nor where parameters
        are sharded across processes (ZeRO-3, FSDP), whose tensors here are shards."""
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and is_deepspeed_zero3_enabled())
        return not getattr(self.args, "save_full_model", False) and not sharded

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer.train; resuming a trainable-only checkpoint is checked here, before any step: the frozen parts'
        fingerprints against the checkpoint's record, then the trainable tensors' names and shapes."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        resumes_trainable = is_trainable_checkpoint(checkpoint)
        # Computed once per run, as the scripts built the model (before DeepSpeed may cast it): frozen weights do not
        # change while training, so every checkpoint of the run reuses these. A run that writes no checkpoint
        # (--save_strategy no, as the demo's) does not read the frozen weights for them.
        self._frozen_fingerprints = None
        saves_checkpoints = self.args.should_save and self.args.save_strategy != SaveStrategy.NO
        if resumes_trainable or (self.writes_trainable_checkpoints and saves_checkpoints):
            self._frozen_fingerprints = frozen_fingerprints(self.model)
        if resumes_trainable:
            check_frozen_parts(checkpoint, self._frozen_fingerprints, self.frozen_sources)
            check_trainable_tensors(checkpoint, self.model)
        if self.writes_trainable_checkpoints:
            parameters = trainable_parameters(self.model).values()
            megabytes = sum(p.numel() * p.element_size() for p in parameters) / 1e6
            logger.info(
                f"Checkpoints hold the {len(parameters)} trainable tensors ({megabytes:,.1f} MB) and "
                f"{FROZEN_PARTS_NAME}; --save_full_model writes whole models instead."
            )
            if self.args.push_to_hub and self.args.hub_strategy == HubStrategy.EVERY_SAVE:
                logger.warning(
                    "--push_to_hub: checkpoints hold the trainable parameters only, so the model is pushed at the end "
                    "of training (the final save is whole); --save_full_model pushes it at every save too."
                )
        # DeepSpeed loads the module strictly (not for peft models), and its files of this checkpoint have no frozen
        # parameters: their absence is accepted now that the fingerprints matched.
        deepspeed_resume = resumes_trainable and self.is_deepspeed_enabled
        with self._frozen_parameters_may_be_missing() if deepspeed_resume else nullcontext():
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    # ---------------------------------------------------------------------------------------------------- saving
    def _save_checkpoint(self, model, trial) -> None:
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint's weights: the trainable ones with the frozen parts' record; any other save: the Trainer's."""
        if not (getattr(self, "_saving_checkpoint", False) and self.writes_trainable_checkpoints):
            return super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info(f"Saving the trainable parameters to {output_dir}")
        tensors = {name: p.detach().contiguous().cpu() for name, p in trainable_parameters(self.model).items()}
        save_file(tensors, os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME), metadata={"format": "pt"})
        write_frozen_parts(output_dir, frozen_parts_record(self._frozen_fingerprints, self.frozen_sources))
        vikdf_module(self.model).config.to_json_file(os.path.join(output_dir, CONFIG_NAME))  # the config alone, no code

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's; under DeepSpeed, its module file leaves out the frozen parameters (the Trainer leaves them
        out for peft models only)."""
        if not (self.is_deepspeed_enabled and self.writes_trainable_checkpoints):
            return super()._save_optimizer_and_scheduler(output_dir)
        engine = self.model_wrapped
        with patch.object(engine, "save_checkpoint", partial(engine.save_checkpoint, exclude_frozen_parameters=True)):
            super()._save_optimizer_and_scheduler(output_dir)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """No push of a trainable-only checkpoint: the Trainer would upload its config.json without weights as the
        model. The final save pushes the whole model (`--hub_strategy checkpoint`/`all_checkpoints`, which upload
        checkpoint folders, need --save_full_model: `vikdf.training.arguments`)."""
        if not self.writes_trainable_checkpoints:
            super()._push_from_checkpoint(checkpoint_folder)

    # ---------------------------------------------------------------------------------------------------- loading
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Trainer's loader, except for a trainable-only checkpoint (checked in `train`): its tensors alone load."""
        if not is_trainable_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info(f"Loading the trainable parameters from {resume_from_checkpoint}.")
        load_trainable(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if not is_trainable_checkpoint(best):
            return super()._load_best_model()
        logger.info(f"Loading the best trainable parameters from {best} (score: {self.state.best_metric}).")
        if self.is_deepspeed_enabled:
            with self._frozen_parameters_may_be_missing():
                return super()._load_best_model()
        load_trainable(self.model, best)

    @contextmanager
    def _frozen_parameters_may_be_missing(self):
        """Within this block, a strict load of `self.model`'s state dict accepts missing frozen entries (the checks
        that make this safe are the caller's)."""
        frozen = {name for name, value in self.model.state_dict(keep_vars=True).items() if not value.requires_grad}

        def accept_missing_frozen(module, incompatible_keys):
            incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if key not in frozen]

        handle = self.model.register_load_state_dict_post_hook(accept_missing_frozen)
        try:
            yield
        finally:
            handle.remove()


__all__ = [
    "TRAINABLE_WEIGHTS_NAME",
    "TrainableCheckpointMixin",
    "trainable_parameters",
    "is_trainable_checkpoint",
    "check_trainable_tensors",
    "load_trainable",
]
