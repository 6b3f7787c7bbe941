"""`transformers.Trainer` subclasses whose `compute_loss` holds the paper's objectives.

- `VIKDFPretrainTrainer`: knowledge distillation (eq. 5) and integration (eq. 9), trained together (§3.4.1).
- `VIKDFDialogueTrainer`: P(R | C, K), the NLL of the response given context and knowledge (§3.4.1).

Gradient accumulation: the pixel- and token-level objectives are normalised by their item counts over the whole
accumulated batch (counted in `_get_num_items_in_batch`), so accumulating micro-batches gives the gradient of one
large batch; TIM, whose negatives are the batch itself, is a per-micro-batch mean scaled by 1/accumulation. The
logged per-objective values are plain micro-batch means, so they do not change with the accumulation setting.

Several processes: with `average_tokens_across_devices` (transformers' default) the counts are summed over ranks,
so a rank's loss is its local sum over the global count; it is then multiplied by the number of processes, as the
base `Trainer.compute_loss` does, because DDP and DeepSpeed average (not sum) gradients over ranks. Without that
factor the loss, the gradient and the `max_grad_norm` clipping threshold were 1/world_size of one process's on the
same global batch.
"""

import errno
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from unittest.mock import patch

import torch
import transformers.trainer
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from vikdf.atomic import (
    STAGING_PREFIX,
    TRAINER_STATE_NAME,
    commit_folder,
    damaged_file,
    is_complete_checkpoint,
    last_complete_checkpoint,
    staging_folder,
)
from modeling_vikdf import VIKDFPretrainingOutput, enabled_objectives
from vikdf.training.losses import (
    IGNORE_INDEX,
    iaci_loss,
    iakr_loss,
    iamtm_loss,
    next_token_positions,
    tamim_loss,
    tim_loss,
)
from vikdf.data.stream_state import check_stream_resume, load_stream_state, save_stream_state, stream_state_name
from vikdf.training.trainable_checkpoints import TrainableCheckpointMixin

logger = logging.get_logger(__name__)

def _tim(outputs: VIKDFPretrainingOutput, batch: dict, args) -> torch.Tensor:
    return tim_loss(outputs.tim_text_embeddings, outputs.tim_image_embeddings, outputs.logit_scale,
                    rank=args.process_index, world_size=args.world_size)


def _tamim(outputs: VIKDFPretrainingOutput, batch: dict, args) -> torch.Tensor:
    return tamim_loss(outputs.tamim_reconstruction, batch["pixel_values"], batch["pixel_mask"], reduction="sum")


def _iamtm(outputs: VIKDFPretrainingOutput, batch: dict, args) -> torch.Tensor:
    return iamtm_loss(outputs.iamtm_logits, batch["clip_mlm_labels"], reduction="sum")


def _iaci(outputs: VIKDFPretrainingOutput, batch: dict, args) -> torch.Tensor:
    return iaci_loss(outputs.iaci_logits, _caption_labels(batch), reduction="sum")


def _iakr(outputs: VIKDFPretrainingOutput, batch: dict, args) -> torch.Tensor:
    return iakr_loss(outputs.iakr_reconstruction, outputs.text_knowledge, reduction="sum")


def _caption_labels(batch: dict) -> torch.Tensor:
    """The IACI rows' labels (B, S): the LLM rows start with one IACI row per image."""
    return batch["llm_labels"][: batch["pixel_values"].shape[0]]


@dataclass(frozen=True)
class Objective:
    """A row of the objective table. `loss(outputs, batch, args)` is a sum over the objective's items in one
    micro-batch, or a mean where `count` is None (TIM, whose negatives are the micro-batch itself);
    `count(batch, num_query_tokens)` is the number of those items. `name` keys `OBJECTIVE_PARTS` (the config switch
    and the heads) and the logged `loss_<name>`; `weight` is the config field of its λ."""

    name: str
    loss: Callable[[VIKDFPretrainingOutput, dict, TrainingArguments], torch.Tensor]
    weight: str
    count: Callable[[dict, int], torch.Tensor] | None


# λ1..λ5 of eq. 5 and eq. 9 over eq. 2, 3, 4, 6 and 8, in `OBJECTIVE_PARTS` order.
OBJECTIVE_TABLE = (
    Objective("tim", _tim, "loss_weight_tim", None),
    Objective("tamim", _tamim, "loss_weight_tamim",
              lambda batch, n: batch["pixel_mask"].sum() * batch["pixel_values"].shape[1]),
    Objective("iamtm", _iamtm, "loss_weight_iamtm", lambda batch, n: (batch["clip_mlm_labels"] != IGNORE_INDEX).sum()),
    Objective("iaci", _iaci, "loss_weight_iaci",
              lambda batch, n: (_caption_labels(batch)[:, 1:] != IGNORE_INDEX).sum()),
    Objective("iakr", _iakr, "loss_weight_iakr", lambda batch, n: torch.tensor(batch["pixel_values"].shape[0] * n)),
)
OBJECTIVES = tuple(objective.name for objective in OBJECTIVE_TABLE)
LOGGED_LOSSES = tuple(f"loss_{name}" for name in OBJECTIVES)
# Batch keys only the losses read (TAMIM's scored pixels); the rest are the model's pre-training inputs.
LOSS_ONLY_INPUTS = ("pixel_mask",)


def count_items(batch: dict[str, torch.Tensor], num_query_tokens: int) -> dict[str, torch.Tensor]:
    """Items each normalised objective averages over in one micro-batch (TIM is per micro-batch, not counted)."""
    return {o.name: o.count(batch, num_query_tokens) for o in OBJECTIVE_TABLE if o.count is not None}


class _MetricsMixin:
    """Per-objective losses averaged over the logging window and over ranks, logged next to the total (like trl)."""

    def _record(self, values: dict[str, torch.Tensor]) -> None:
        if not hasattr(self, "_window"):
            self._window = {"train": defaultdict(list), "eval": defaultdict(list)}
        mode = "train" if self.model.training else "eval"
        # One reduce and one host sync for all objectives, not one per objective.
        stacked = torch.stack([value.detach().float() for value in values.values()])
        for name, value in zip(values, self.accelerator.reduce(stacked, reduction="mean").tolist(), strict=True):
            self._window[mode][name].append(value)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        window = getattr(self, "_window", None)
        if window is not None:
            mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + name: sum(v) / len(v) for name, v in window[mode].items() if v})
            window[mode].clear()
        super().log(logs, *args, **kwargs)


RESUME_LAST = "last"


def resolve_resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint`: a checkpoint folder, or "last" for the newest complete one in `output_dir`
    (a fresh start when there is none yet). A folder that an interrupted save left incomplete is refused."""
    if value is None:
        return None
    if value == RESUME_LAST:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            logger.info(f"--resume_from_checkpoint last: no complete checkpoint in {output_dir} yet; starting fresh.")
            return None
        logger.info(f"--resume_from_checkpoint last: resuming from {checkpoint}.")
        return str(checkpoint)
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r}: no such folder.")
    if not is_complete_checkpoint(value):
        raise ValueError(
            f"--resume_from_checkpoint {value!r} is incomplete (no readable {TRAINER_STATE_NAME}): its save was "
            f"interrupted. Use --resume_from_checkpoint {RESUME_LAST} to take the newest complete checkpoint."
        )
    damage = damaged_file(value)
    if damage is not None:
        raise ValueError(
            f"--resume_from_checkpoint {value!r} is damaged: {damage} cannot be read. Resume from an earlier "
            f"checkpoint (--resume_from_checkpoint {RESUME_LAST} passes over damaged ones)."
        )
    return value


def _is_disk_full(error: BaseException) -> bool:
    # safetensors and torch report a full disk in their own exception types, with the OS message in the text.
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error)


@contextmanager
def _reporting_full_disk(staging: str, what: str, folder: str):
    """A save into `staging` that fills the disk: the partial copy is removed (what was saved before is untouched,
    see `_AtomicSaveMixin`) and the error says so and what to do."""
    try:
        yield
    except Exception as error:
        if not _is_disk_full(error):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while saving {what} in {folder}. The partial save was removed; earlier "
            "checkpoints and saves are as they were. Free some space (or lower --save_total_limit), then resume "
            f"with --resume_from_checkpoint {RESUME_LAST}.",
        ) from error


class _FrozenQuantisedLLMMixin:
    """Lets the Trainer train a VIKDF whose frozen LLM is bitsandbytes-quantised (`vikdf.training.quantization`).

    transformers refuses any quantised model without PEFT adapters ("purely quantized"), because it cannot train the
    quantised weights. VIKDF never trains them: the queries, the IQ-Former and the projections train in full
    precision, as LoRA adapters do over a 4-bit LLM. Checked here (no trainable parameter in a quantised layer),
    then the Trainer's own check is passed over for this model only.
    """

    def __init__(self, *args, model=None, **kwargs):
        if getattr(model, "is_quantized", False):
            quantised = [name for name, parameter in model.named_parameters()
                         if parameter.requires_grad and type(parameter).__module__.startswith("bitsandbytes")]
            if quantised:
                raise ValueError(f"Quantised LLM weights are set to train ({quantised[0]}, ...); they must stay frozen.")
            with patch.object(transformers.trainer, "validate_quantization_for_training", lambda model: None):
                super().__init__(*args, model=model, **kwargs)
        else:
            super().__init__(*args, model=model, **kwargs)


class _AtomicSaveMixin:
    """Checkpoints and the final save written to a `_saving-*` folder and renamed once complete (`vikdf.atomic`).

    `Trainer._save_checkpoint` writes the weights, the optimizer, scheduler and RNG states, then
    `trainer_state.json` into `checkpoint-N`; a kill in between left a folder that looked loadable and that
    `get_last_checkpoint` picked. Here the Trainer writes into `_saving-checkpoint-N/checkpoint-N` (its run folder
    is redirected while it saves), and the folder is renamed to `checkpoint-N`, then rotated, once all is written.
    """

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_checkpoint_staging", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial=trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer.train, except that resuming a run already at its last step trains and writes nothing
        (`finished_before_start`): the Trainer would run one step more and save it, at every requeue of the job."""
        self.finished_before_start = False
        if isinstance(resume_from_checkpoint, str):
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            max_steps = self.args.max_steps
            if max_steps <= 0:  # set by the epochs: the Trainer's count needs the loader's length
                max_steps = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
            if state.global_step >= max_steps:
                logger.warning(
                    f"{resume_from_checkpoint} is already at max_steps ({max_steps}): nothing to train, and nothing "
                    "in the output folder is changed. Raise --max_steps (or the epochs) to train further."
                )
                self.state, self.finished_before_start = state, True
                return TrainOutput(state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            staging_folder(run_dir, name)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging
        try:
            with _reporting_full_disk(staging, name, run_dir):
                super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every rank's optimizer shards are written
        if self.args.should_save:
            staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
            if self.state.best_model_checkpoint == staged:  # the Trainer found this step the best, under its staged name
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            if os.path.isdir(final):  # saved again at the same step (e.g. after resuming from it)
                os.replace(final, os.path.join(staging, "previous"))
            os.replace(staged, final)
            shutil.rmtree(staging)
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if getattr(self, "_checkpoint_staging", None) is not None:  # a checkpoint, already inside its staging folder
            return super().save_model(output_dir, _internal_call=True)
        # The final save, or push_to_hub's re-save of the output folder (an internal call): staged, then moved in.
        target = output_dir or self.args.output_dir
        staged = os.path.join(target, STAGING_PREFIX + "model")
        if self.args.should_save:
            staging_folder(target, "model")
        self.accelerator.wait_for_everyone()
        with _reporting_full_disk(staged, "the final model", target):
            super().save_model(staged, _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            commit_folder(staged, target)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


class VIKDFPretrainTrainer(_FrozenQuantisedLLMMixin, _AtomicSaveMixin, TrainableCheckpointMixin, _MetricsMixin, Trainer):
    """Joint knowledge distillation and integration on image–text pairs (paper §3.2–3.4.1).

    Batches come from `vikdf.data.collators.PretrainCollator`; the model's forward turns one into a
    `VIKDFPretrainingOutput`, and `compute_loss` weighs the losses of `OBJECTIVE_TABLE`. They are logged as
    `LOGGED_LOSSES` (`loss_tim`, ...) next to the weighted total; a disabled objective is not computed.
    """

    # Token- and pixel-level objectives are normalised over the accumulated batch in compute_loss.
    loss_is_scaled_for_ga = True

    def get_train_dataloader(self) -> DataLoader:
        """A `StatefulDataLoader` of its own when the dataset splits itself across ranks and workers
        (`vikdf.data.pairs`), restored to the checkpoint's stream position when resuming.

        accelerate would otherwise either read on rank 0 only and dispatch, or make every rank read everything and
        keep 1/N of it; the pair stream already gives each rank its own share.
        """
        if not hasattr(self.train_dataset, "skips"):
            return super().get_train_dataloader()
        loader = StatefulDataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_num_workers > 0 and self.args.dataloader_persistent_workers,
            snapshot_every_n_steps=self._stream_snapshot_interval(),
            # Starting an iterator draws its base seed from this generator, not from the global RNG, whose state
            # the resumed run has just restored for dropout.
            generator=torch.Generator().manual_seed(self.args.seed),
        )
        if getattr(self, "_stream_state", None) is not None:
            loader.load_state_dict(self._stream_state)
        self._pair_loader = loader
        return loader

    def _stream_snapshot_interval(self) -> int:
        """Batches between the workers' state snapshots: one per checkpoint, since a snapshot carries the shuffle
        buffer. A checkpoint off this grid still resumes exactly, by reading the batches since the last snapshot."""
        save_steps = self.args.save_steps
        if self.args.save_strategy != "steps" or not save_steps:
            return 1
        steps = math.ceil(self.args.max_steps * save_steps) if save_steps < 1 else int(save_steps)
        return max(1, steps * self.args.gradient_accumulation_steps)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer.train; resuming restores the pair stream's saved position (no batch is read to skip it)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._stream_state = None
        if resume_from_checkpoint and hasattr(self.train_dataset, "skips"):
            path = check_stream_resume(resume_from_checkpoint, self.args)
            if path is not None:
                self._stream_state = load_stream_state(path)
            elif not self.args.ignore_data_skip:
                logger.warning(
                    f"{resume_from_checkpoint} holds no {stream_state_name(self.args.process_index)}: skipping the "
                    "consumed batches by reading them again."
                )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def get_resumed_dataloader(self, dataloader: DataLoader, num_batches: int) -> DataLoader:
        """The restored loader already starts after the consumed batches; the Trainer still counts them, so the
        logged epoch and the step within it go on from the checkpoint's."""
        if getattr(self, "_stream_state", None) is not None:
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    def _save_rng_state(self, output_dir: str) -> None:
        """The stream position is saved with the RNG state, one file per process."""
        super()._save_rng_state(output_dir)
        loader = getattr(self, "_pair_loader", None)
        if loader is not None:
            save_stream_state(loader.state_dict(), os.path.join(output_dir, stream_state_name(self.args.process_index)))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        skips = getattr(self.train_dataset, "skips", None)
        if skips is not None and not any(key.startswith("eval_") for key in logs):
            # Corrupt images, empty captions, members without text: counted by the readers, reported here.
            counts = skips.counts
            if self.args.world_size > 1:
                # Each rank reads (and skips) only its own share of the data: report the sum over ranks.
                local = torch.tensor(list(counts.values()), dtype=torch.int64, device=self.args.device)
                counts = dict(zip(counts, self.accelerator.reduce(local, reduction="sum").tolist(), strict=True))
            logs["skipped_pairs"] = sum(counts.values())
            logs.update({f"skipped_{reason}": count for reason, count in counts.items() if count})
        super().log(logs, *args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> dict[str, torch.Tensor]:
        n = self.accelerator.unwrap_model(self.model).config.num_query_tokens
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.tensor(0))
        for batch in batch_samples:
            for name, count in count_items(batch, n).items():
                totals[name] = totals[name] + count.cpu()
        if not totals:
            return {}
        counts = torch.stack([totals[name] for name in totals]).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # The items of the global batch, as `Trainer._get_num_items_in_batch` counts tokens.
            counts = self.accelerator.reduce(counts, reduction="sum")
        return dict(zip(totals, counts, strict=True))

    def _rank_loss_scale(self) -> int:
        """The factor `Trainer.compute_loss` applies to a loss normalised by counts summed over ranks: the number
        of processes that see different data, since DDP and DeepSpeed average the ranks' gradients. `Trainer` has it
        only inline, applied to the whole loss; here it must scale the count-normalised objectives and not TIM's
        per-rank mean, so it is computed again."""
        if not self.args.average_tokens_across_devices:
            return 1
        return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        config = self.accelerator.unwrap_model(model).config
        local_counts = count_items(inputs, config.num_query_tokens)
        rank_scale = self._rank_loss_scale()
        if not model.training or not isinstance(num_items_in_batch, dict):
            num_items_in_batch, rank_scale = local_counts, 1
        accumulation = self.current_gradient_accumulation_steps if model.training else 1

        # One forward through the (possibly distributed) model: every trained part is used inside it.
        outputs = model(**{key: value for key, value in inputs.items() if key not in LOSS_ONLY_INPUTS})
        enabled = enabled_objectives(config)
        total, logged = 0.0, {}
        for objective in OBJECTIVE_TABLE:
            if objective.name not in enabled:
                continue
            value = objective.loss(outputs, inputs, self.args)
            if objective.count is None:
                scaled = value / accumulation
                logged[f"loss_{objective.name}"] = value
            else:
                # value is a sum over this micro-batch's items: normalise by the accumulated (global) batch's count.
                scaled = value * rank_scale / num_items_in_batch[objective.name].clamp(min=1)
                logged[f"loss_{objective.name}"] = value / local_counts[objective.name].clamp(min=1)
            total = total + getattr(config, objective.weight) * scaled
        self._record(logged)
        if return_outputs:
            return total, logged
        return total


class VIKDFDialogueTrainer(_FrozenQuantisedLLMMixin, _AtomicSaveMixin, TrainableCheckpointMixin, _MetricsMixin, Trainer):
    """Dialogue fine-tuning of P(R | C, K) (§3.4.1): response NLL; the queries, IQ-Former and
    `language_projection` train, everything else stays frozen.

    The LLM's loss is normalised by the response tokens of the whole accumulated batch, summed over ranks
    (`num_items_in_batch`), and the base `Trainer.compute_loss` multiplies it by the number of processes; so neither
    accumulation nor the number of processes changes the logged loss or the gradient of a given global batch.
    """

    def __init__(self, *args, model_card_writer: Callable[[str], None] | None = None, **kwargs):
        # Called with the output folder instead of the generic Trainer card (e.g. before a push to the Hub).
        self.model_card_writer = model_card_writer
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The LLM's response NLL (the base `Trainer`'s loss), with the LM head run on the response positions only."""
        inputs = {**inputs, "logits_positions": next_token_positions(inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def create_model_card(self, *args, **kwargs) -> None:
        """The VIKDF card of `model_card_writer` (see `vikdf.evaluation.model_card`) when one was given, else Trainer's draft."""
        if self.model_card_writer is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self.model_card_writer(self.args.output_dir)


__all__ = [
    "VIKDFPretrainTrainer",
    "VIKDFDialogueTrainer",
    "enabled_objectives",
    "Objective",
    "OBJECTIVE_TABLE",
    "OBJECTIVES",
    "LOGGED_LOSSES",
    "RESUME_LAST",
    "resolve_resume_checkpoint",
    "stream_state_name",
]
