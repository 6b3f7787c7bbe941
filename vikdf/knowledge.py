"""Textualising visual implicit knowledge (paper §5.4, Fig. 6).

The dialogue context C alone goes through the CLIP text tower and the IQ-Former, which distil `K` (P(K|C), no
image anywhere); the LLM then reads `K` in the IACI caption layout of eq. 6, `[bos] <k>×n {caption prompt}`, and
writes what it "sees". The implementation lives in the remote-code file `pipeline_vikdf.py`, so that the Hub
pipeline (`return_knowledge=True`) and `eval_dialogue.py --textualise` share one copy; it decodes with the checkpoint's
generation config (the released settings in every checkpoint the project writes) unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline_vikdf import textualise_knowledge as _textualise_knowledge
from processing_vikdf import VIKDFProcessor
from vikdf.evaluation import Context


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
        generate_kwargs: override the checkpoint's generation config.
    """
    return _textualise_knowledge(model, processor, contexts, prompt=prompt, batch_size=batch_size, **generate_kwargs)


__all__ = ["textualise_knowledge"]
