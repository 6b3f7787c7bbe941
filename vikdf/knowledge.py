"""Textualising visual implicit knowledge (paper §5.4, Fig. 6).

The dialogue context C alone goes through the CLIP text tower and the IQ-Former, which distil `K` (P(K|C), no
image anywhere); the LLM then reads `K` in the IACI caption layout of eq. 6, `[bos] <k>×n {caption prompt}`, and
writes what it "sees". The prompt ids are the prefix `VIKDFProcessor.caption_inputs` builds for an empty caption,
so they are exactly those the model was pre-trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers.utils import logging

from processing_vikdf import IGNORE_INDEX, VIKDFProcessor
from vikdf.evaluation import RELEASED_GENERATION, Context

logger = logging.get_logger(__name__)


def caption_prompt_ids(processor: VIKDFProcessor, prompt: str) -> list[int]:
    """Token ids of `[bos] <k>×n {prompt}` — the IACI layout (eq. 6) up to where the caption begins."""
    row = processor.caption_inputs([""], [prompt])
    ids, labels = row["input_ids"][0], row["labels"][0]
    prefix = ids[labels == IGNORE_INDEX]
    # With an empty caption the only labelled token is eos, right after the prefix.
    if len(prefix) != len(ids) - 1 or int(ids[-1]) != processor.tokenizer.eos_token_id:
        raise RuntimeError("VIKDFProcessor.caption_inputs no longer ends an empty caption with eos alone.")
    return prefix.tolist()


@torch.no_grad()
def textualise_knowledge(
    model,
    processor: VIKDFProcessor,
    contexts: Sequence[Context],
    prompt: str | None = None,
    batch_size: int = 16,
    **generate_kwargs: Any,
) -> list[str]:
    """Text the LLM writes from the knowledge `K` distilled from each context (no image, no context text).

    Args:
        contexts: dialogue contexts, strings or lists of turns.
        prompt: the caption instruction; default the model's first caption prompt, the paper's
            "Write a short description for the image."
        generate_kwargs: override the released generation settings (beam 3, no repeated 3-grams, 32 tokens).
    """
    if prompt is None:
        prompt = model.config.caption_prompts[0]
    settings = {**RELEASED_GENERATION, **generate_kwargs}
    settings.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    settings.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
    prefix = torch.tensor([caption_prompt_ids(processor, prompt)], device=model.device)
    model.eval()
    texts: list[str] = []
    for start in range(0, len(contexts), batch_size):
        chunk = list(contexts[start : start + batch_size])
        clip = {name: tensor.to(model.device) for name, tensor in processor.clip_text_inputs(chunk).items()}
        knowledge = model.get_text_knowledge(clip["clip_input_ids"], clip["clip_attention_mask"])
        # Every row has the same prompt, so no padding is needed.
        input_ids = prefix.repeat(len(chunk), 1)
        generated = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), knowledge=knowledge, **settings
        )
        texts.extend(processor.decode_responses(generated, input_ids.shape[1]))
    return texts


__all__ = ["caption_prompt_ids", "textualise_knowledge"]
