"""A causal check of the knowledge: evaluate a checkpoint with its soft prompts zeroed or shuffled across the batch.

If the distilled knowledge `K` is what carries an answer into the response, giving each dialogue another
dialogue's `K` must take the answer away (knowledge accuracy falls to chance), and giving it none must too. The
hook sits on the output of `language_projection`, the one place every path (generation, perplexity,
textualisation) turns `K` into the LLM's soft prompts, so the evaluation code itself stays unchanged:

    with knowledge_ablation(model, "shuffle"):
        result = evaluate_dialogues(model, processor, dialogues)

"zero" writes zero vectors into the knowledge slots (the same as a `language_projection` whose outputs are zero);
"shuffle" gives row i the soft prompts of another row of the same batch (a random cyclic permutation, so no row
keeps its own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vikdf.defaults import KNOWLEDGE_ABLATIONS



def _derangement(size: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(size) with no fixed point: one cycle through a random order."""
    order = torch.randperm(size, generator=generator)
    permutation = torch.empty_like(order)
    permutation[order] = order.roll(-1)
    return permutation


@contextlib.contextmanager
def knowledge_ablation(model, mode: str, seed: int = 0) -> Iterator[None]:
    """Within the block, `model`'s soft prompts are zeroed (`mode="zero"`) or shuffled across the batch ("shuffle")."""
    if mode not in KNOWLEDGE_ABLATIONS:
        raise ValueError(f"knowledge ablation {mode!r}; choose one of {KNOWLEDGE_ABLATIONS}.")
    if mode == "none":
        yield
        return
    generator = torch.Generator().manual_seed(seed)

    def ablate(module, inputs, projected: torch.Tensor) -> torch.Tensor:
        if mode == "zero":
            return torch.zeros_like(projected)
        if projected.shape[0] < 2:
            raise ValueError(
                "--knowledge_ablation shuffle needs at least two dialogues per batch; this batch has one. Choose a "
                "--batch_size that leaves no batch of a single dialogue."
            )
        return projected[_derangement(projected.shape[0], generator).to(projected.device)]

    handle = model.language_projection.register_forward_hook(ablate)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["KNOWLEDGE_ABLATIONS", "knowledge_ablation"]
