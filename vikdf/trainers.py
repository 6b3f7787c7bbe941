"""`transformers.Trainer` subclasses whose `compute_loss` holds the paper's objectives.

- `VIKDFPretrainTrainer`: knowledge distillation (eq. 5) and integration (eq. 9), trained together (§3.4.1).
- `VIKDFDialogueTrainer`: P(R | C, K), the NLL of the response given context and knowledge (§3.4.1).

Gradient accumulation: the pixel- and token-level objectives are normalised by their item counts over the whole
accumulated batch (counted in `_get_num_items_in_batch`), so accumulating micro-batches gives the gradient of one
large batch; TIM, whose negatives are the batch itself, is a per-micro-batch mean scaled by 1/accumulation. The
logged per-objective values are plain micro-batch means, so they do not change with the accumulation setting.
"""

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.utils import logging

from vikdf.losses import IGNORE_INDEX, iaci_loss, iakr_loss, iamtm_loss, tamim_loss, tim_loss
from vikdf.masking import apply_pixel_mask

logger = logging.get_logger(__name__)

OBJECTIVES = ("tim", "tamim", "iamtm", "iaci", "iakr")


def enabled_objectives(config) -> tuple[str, ...]:
    """The objectives a config trains: the ablation switches of Table 3 remove TIM, TAMIM, IAMTM or IAKR (−BVIF)."""
    switches = {"tim": config.use_tim, "tamim": config.use_tamim, "iamtm": config.use_iamtm, "iaci": True, "iakr": config.use_bvif}
    return tuple(name for name in OBJECTIVES if switches[name])


def loss_weights(config) -> dict[str, float]:
    """λ1..λ5 of eq. 5 and eq. 9."""
    return {
        "tim": config.loss_weight_tim,
        "tamim": config.loss_weight_tamim,
        "iamtm": config.loss_weight_iamtm,
        "iaci": config.loss_weight_iaci,
        "iakr": config.loss_weight_iakr,
    }


def count_items(batch: dict[str, torch.Tensor], num_query_tokens: int) -> dict[str, torch.Tensor]:
    """Items each normalised objective averages over in one micro-batch (TIM is per micro-batch, not counted)."""
    images = batch["pixel_values"].shape[0]
    return {
        "tamim": batch["pixel_mask"].sum() * batch["pixel_values"].shape[1],
        "iamtm": (batch["clip_mlm_labels"] != IGNORE_INDEX).sum(),
        "iaci": (batch["llm_labels"][:images, 1:] != IGNORE_INDEX).sum(),
        "iakr": torch.tensor(images * num_query_tokens),
    }


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


class VIKDFPretrainTrainer(_MetricsMixin, Trainer):
    """Joint knowledge distillation and integration on image–text pairs (paper §3.2–3.4.1).

    Batches come from `vikdf.data.collators.PretrainCollator`. Losses are logged as `loss_tim`, `loss_tamim`,
    `loss_iamtm`, `loss_iaci`, `loss_iakr` next to the weighted total; a disabled objective is not computed.
    """

    # Token- and pixel-level objectives are normalised over the accumulated batch in compute_loss.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # the collator's keys are not forward() arguments
        self.label_names = ["llm_labels"]
        self.args.prediction_loss_only = True

    def get_train_dataloader(self) -> DataLoader:
        """A plain DataLoader when the dataset splits itself across ranks and workers (`vikdf.data.pairs`).

        accelerate would otherwise either read on rank 0 only and dispatch, or make every rank read everything and
        keep 1/N of it; the pair stream already gives each rank its own share.
        """
        if not hasattr(self.train_dataset, "skips"):
            return super().get_train_dataloader()
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_num_workers > 0 and self.args.dataloader_persistent_workers,
        )

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
        return {name: count.to(device) for name, count in totals.items()}

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        vikdf = self.accelerator.unwrap_model(model)
        config = vikdf.config
        objectives = enabled_objectives(config)
        local_counts = count_items(inputs, config.num_query_tokens)
        if not model.training or not isinstance(num_items_in_batch, dict):
            num_items_in_batch = local_counts
        accumulation = self.current_gradient_accumulation_steps if model.training else 1

        means = self._objective_sums(model, vikdf, inputs, objectives)
        weights = loss_weights(config)
        total, logged = 0.0, {}
        for name, value in means.items():
            if name == "tim":
                scaled = value / accumulation
                logged["loss_tim"] = value
            else:
                # value is a sum over this micro-batch's items: normalise by the accumulated batch's count.
                scaled = value / num_items_in_batch[name].clamp(min=1)
                logged[f"loss_{name}"] = value / local_counts[name].clamp(min=1)
            total = total + weights[name] * scaled
        self._record(logged)
        if return_outputs:
            return total, logged
        return total

    def _objective_sums(self, model, vikdf, batch: dict[str, torch.Tensor], objectives: tuple[str, ...]):
        """TIM as a mean; the other objectives as sums over their items (masked pixels, tokens, query slots)."""
        pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
        images = pixel_values.shape[0]
        losses = {}

        # Frozen text tower: clean and masked captions in one call (the masked copy only feeds IAMTM).
        clip_ids, clip_mask = batch["clip_input_ids"], batch["clip_attention_mask"]
        if "iamtm" in objectives:
            states = vikdf.encode_text(torch.cat([clip_ids, batch["clip_masked_input_ids"]]), clip_mask.repeat(2, 1))
            text_states, masked_text_states = states[:images], states[images:]
        else:
            text_states = vikdf.encode_text(clip_ids, clip_mask)
        text_knowledge = vikdf.distill_knowledge(text_states, clip_mask)  # K_T: (B, n, D)

        if {"tim", "tamim", "iamtm"} & set(objectives):
            masked_pixels = apply_pixel_mask(pixel_values, batch["pixel_replaced_mask"]) if "tamim" in objectives else None
            image_states, masked_image_states = self._image_states(vikdf, pixel_values, masked_pixels)
            image_knowledge = vikdf.distill_knowledge(image_states)  # K_I: (B, n, D)
        if "tim" in objectives:
            text_embeddings, image_embeddings = vikdf.tim_embeddings(text_knowledge, image_knowledge)
            losses["tim"] = tim_loss(text_embeddings, image_embeddings, vikdf.logit_scale)
        if "tamim" in objectives:
            reconstruction = vikdf.reconstruct_image(masked_image_states, text_knowledge)
            losses["tamim"] = tamim_loss(reconstruction, pixel_values, pixel_mask, reduction="sum")
        if "iamtm" in objectives:
            losses["iamtm"] = self._masked_token_sum(vikdf, masked_text_states, image_knowledge, batch["clip_mlm_labels"])

        losses["iaci"], iakr_states = self._language_pass(model, batch, text_knowledge, "iakr" in objectives)
        if "iakr" in objectives:
            reconstructed = vikdf.reconstruct_knowledge(iakr_states, batch["llm_input_ids"][images:])
            losses["iakr"] = iakr_loss(reconstructed, text_knowledge, reduction="sum")
        return losses

    # The three stages below are where the step's speed-ups live; benchmarks/bench_pretrain_step.py overrides them
    # to time each one against its slower alternative.
    def _image_states(self, vikdf, pixel_values: torch.Tensor, masked_pixels: torch.Tensor | None):
        """Frozen vision states (B, P, E) of the clean images and of the TAMIM-masked ones (None without TAMIM), in
        one pass of the vision tower."""
        images = pixel_values.shape[0]
        pixels = pixel_values if masked_pixels is None else torch.cat([pixel_values, masked_pixels])
        states = vikdf.encode_image(pixels)
        return states[:images], None if masked_pixels is None else states[images:]

    def _masked_token_sum(self, vikdf, masked_text_states, image_knowledge, labels: torch.Tensor) -> torch.Tensor:
        """IAMTM (eq. 4) summed over the masked tokens; the vocabulary head runs on those tokens only."""
        masked = labels != IGNORE_INDEX
        logits = vikdf.predict_masked_tokens(masked_text_states, image_knowledge, masked)  # (M, V)
        return iamtm_loss(logits, labels[masked], reduction="sum")

    def _language_pass(self, model, batch: dict[str, torch.Tensor], text_knowledge: torch.Tensor, wants_iakr: bool):
        """IACI (eq. 6) summed over caption tokens, and the IAKR rows' final LLM states (None without IAKR): IACI rows
        then IAKR rows in one call through the (possibly distributed) model's forward."""
        images = text_knowledge.shape[0]
        llm_ids = batch["llm_input_ids"]
        outputs = model(
            input_ids=llm_ids,
            attention_mask=batch["llm_attention_mask"],
            knowledge=text_knowledge.repeat(llm_ids.shape[0] // images, 1, 1),
            output_hidden_states=wants_iakr,
            use_cache=False,
        )
        iaci = iaci_loss(outputs.logits[:images], batch["llm_labels"][:images], reduction="sum")
        return iaci, outputs.hidden_states[-1][images:] if wants_iakr else None


class VIKDFDialogueTrainer(_MetricsMixin, Trainer):
    """Dialogue fine-tuning of P(R | C, K) (§3.4.1): response NLL; the queries, IQ-Former and
    `language_projection` train, everything else stays frozen.

    The LLM's loss is normalised by the response tokens of the whole accumulated batch (`num_items_in_batch`), so
    accumulation gives the gradient of one large batch and the logged loss does not grow with it.
    """

    def __init__(self, *args, model_card_writer: Callable[[str], None] | None = None, **kwargs):
        # Called with the output folder instead of the generic Trainer card (e.g. before a push to the Hub).
        self.model_card_writer = model_card_writer
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_model_card(self, *args, **kwargs) -> None:
        """The VIKDF card of `model_card_writer` (see `vikdf.model_card`) when one was given, else Trainer's draft."""
        if self.model_card_writer is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            self.model_card_writer(self.args.output_dir)


__all__ = ["VIKDFPretrainTrainer", "VIKDFDialogueTrainer", "enabled_objectives", "loss_weights", "OBJECTIVES"]
