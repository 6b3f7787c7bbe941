"""Collators that turn examples into the batches the VIKDF trainers take.

Every random choice of the pre-training collator (crop, pixel mask, caption mask, prompts) is drawn from a
generator seeded by (seed, the example's `stream_position` in the pair stream), so a run is reproducible whatever
the global RNG does, and a run resumed from a checkpoint sees exactly the batches an uninterrupted run would have
seen without the collator keeping any state. Examples without a stream position (plain lists) are seeded by
(seed, DataLoader worker, batch number, position in batch).
"""

import random
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import get_worker_info

from configuration_vikdf import VIKDFConfig
from processing_vikdf import IGNORE_INDEX, VIKDFProcessor
from vikdf.data.pairs import build_image_transform
from vikdf.training.masking import mask_caption_tokens, tamim_pixel_masks


@contextmanager
def _seeded_global_rng(seed: int):
    """Run a block (e.g. timm's transforms, which draw from `random` and torch) under a fixed seed, restoring the
    global generators afterwards so that training randomness (dropout) is untouched."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


@dataclass
class PretrainCollator:
    """Image–text pairs → one pre-training batch (paper §3.2–3.3).

    Examples are `{"image": PIL image, "caption": str, ...}` (from `vikdf.data.pairs`) or already transformed
    `{"pixel_values": tensor, "caption": str, ...}`. The batch holds the clean image and TAMIM's two pixel masks
    (`pixel_mask`: scored, `pixel_replaced_mask`: set to 0; see `vikdf.training.masking`), the clean and IAMTM-masked
    caption for CLIP, and the LLM rows: IACI rows first, then (with BVIF) IAKR rows.
    """

    processor: VIKDFProcessor
    config: VIKDFConfig
    image_transform: Callable | None = None
    seed: int = 0
    _batches: int = field(default=0, init=False)

    def __post_init__(self):
        if self.image_transform is None:
            vision = self.config.clip_config.vision_config
            processor = self.processor.image_processor
            self.image_transform = build_image_transform(
                vision.image_size, train=True, mean=processor.image_mean, std=processor.image_std
            )

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        config, batch_number = self.config, self._batches
        self._batches += 1
        # Each DataLoader worker holds its own copy of this collator and so its own batch counter: the worker id
        # keeps two workers' n-th batches from drawing the same crops and masks.
        worker = get_worker_info()
        stream = () if worker is None else (worker.id,)
        generators = []
        pixels = []
        for position, example in enumerate(examples):
            where = example["stream_position"] if "stream_position" in example else (*stream, batch_number, position)
            example_seed = hash((self.seed, *where)) % (2**63)
            generators.append(torch.Generator().manual_seed(example_seed))
            if "pixel_values" in example:
                pixels.append(example["pixel_values"])
            else:
                with _seeded_global_rng(example_seed):
                    pixels.append(self.image_transform(example["image"]))
        pixel_values = torch.stack(pixels)
        _, _, height, width = pixel_values.shape
        vision = config.clip_config.vision_config
        pixel_masks = [
            tamim_pixel_masks(
                height, width, patch_size=config.mask_patch_size, subpatch_size=vision.patch_size,
                mask_ratio=config.mask_ratio, keep_ratio=config.mask_keep_ratio, generator=generator,
            )
            for generator in generators
        ]

        captions = [example["caption"] for example in examples]
        clip = self.processor.clip_text_inputs(captions, truncation_side="right")
        clip_tokenizer = self.processor.clip_tokenizer
        masked_rows = [
            mask_caption_tokens(
                clip["clip_input_ids"][i : i + 1], clip_tokenizer.eos_token_id,
                attention_mask=clip["clip_attention_mask"][i : i + 1],
                special_token_ids={clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id},
                mask_ratio=config.text_mask_ratio, keep_ratio=config.text_mask_keep_ratio, generator=generator,
            )
            for i, generator in enumerate(generators)
        ]

        pick = [random.Random(int(torch.randint(2**31, (1,), generator=g))) for g in generators]
        caption_prompts = [rng.choice(config.caption_prompts) if config.use_bvif else "" for rng in pick]
        llm = [
            self.processor.caption_inputs(
                captions, caption_prompts, max_caption_tokens=config.caption_max_length,
                score_eos=config.caption_loss_on_eos,
            )
        ]
        if config.use_bvif:
            reconstruction_prompts = [rng.choice(config.reconstruction_prompts) for rng in pick]
            llm.append(
                self.processor.reconstruction_inputs(
                    captions, reconstruction_prompts, max_caption_tokens=config.caption_max_length
                )
            )
            llm[1]["labels"] = torch.full_like(llm[1]["input_ids"], IGNORE_INDEX)
        pad_values = {"input_ids": self.processor.tokenizer.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            "pixel_values": pixel_values,
            "pixel_mask": torch.stack([masks.scored for masks in pixel_masks]),
            "pixel_replaced_mask": torch.stack([masks.replaced for masks in pixel_masks]),
            **clip,
            "clip_masked_input_ids": torch.cat([ids for ids, _ in masked_rows]),
            "clip_mlm_labels": torch.cat([labels for _, labels in masked_rows]),
            # The IACI rows, then the IAKR rows, right padded to the widest of both.
            **{
                f"llm_{name}": pad_sequence([row for rows in llm for row in rows[name]], batch_first=True, padding_value=value)
                for name, value in pad_values.items()
            },
        }


@dataclass
class DialogueCollator:
    """Dialogues (objects with `context` and `response`, or dicts with those keys) → P(R | C, K) training batch.

    `with_knowledge=False` gives the same template without knowledge (the LoRA baseline of Table 4).
    """

    processor: VIKDFProcessor
    with_knowledge: bool = True

    def __call__(self, dialogues: list) -> dict[str, torch.Tensor]:
        contexts = [_field(d, "context") for d in dialogues]
        responses = [_field(d, "response") for d in dialogues]
        return self.processor.dialogue_batch(contexts, responses, self.with_knowledge)


def _field(record, name: str):
    return record[name] if isinstance(record, dict) else getattr(record, name)


__all__ = ["PretrainCollator", "DialogueCollator"]
