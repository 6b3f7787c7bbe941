"""`eval_dialogue.py` across processes (`accelerate launch --num_processes N eval_dialogue.py ...`).

The test set is cut into the batches a single process would run (`vikdf.evaluation`'s length order), and batch b
goes to rank b mod N, each rank on its own device. Every dialogue is thus generated and scored in the very batch
it would have been in alone, so hypotheses and per-dialogue NLLs are bitwise those of a 1-process run (sampling
aside: `--do_sample` draws depend on which batches a process runs). Rank 0 gathers them, puts them back in the
test set's order and computes the metrics, as one process would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from accelerate import PartialState
from accelerate.utils import gather_object
from transformers.utils import logging

from vikdf.evaluation import (
    PPL_CONVENTIONS,
    _batches,
    _context,
    _field,
    _length_order,
    generate_responses,
    perplexities,
    response_nll,
    score_responses,
)

logger = logging.get_logger(__name__)


def rank_share(contexts: Sequence, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Indices of the dialogues rank `rank` evaluates: whole single-process batches b with b mod world_size = rank,
    in the single-process order (so that the rank's own batching rebuilds exactly those batches)."""
    batches = list(_batches(_length_order(contexts), batch_size))
    return [index for b, batch in enumerate(batches) if b % world_size == rank for index in batch]


def evaluate_dialogues_across_processes(
    model,
    processor,
    dialogues: Sequence[Any],
    state: PartialState,
    *,
    with_knowledge: bool = True,
    glove_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    compute_perplexity: bool = True,
    seed: int | None = None,
    progress: bool = True,
    **generate_kwargs,
) -> dict[str, Any] | None:
    """`vikdf.evaluation.evaluate_dialogues` split over the processes of `state`: the result on rank 0, None on
    the others. Both PPL figures come from the per-dialogue NLLs and token counts, gathered in test-set order, so they
    equal one process's."""
    if not dialogues:
        raise ValueError("No dialogues to evaluate.")
    contexts = [_context(d) for d in dialogues]
    references = [_field(d, "response") for d in dialogues]
    mine = rank_share(contexts, batch_size, state.process_index, state.num_processes)
    logger.info(f"Process {state.process_index} of {state.num_processes}: {len(mine)} of {len(dialogues)} dialogues.")
    my_contexts = [contexts[i] for i in mine]
    hypotheses = generate_responses(
        model, processor, my_contexts, with_knowledge=with_knowledge, batch_size=batch_size, seed=seed,
        progress=progress and state.is_main_process, **generate_kwargs,
    )
    nlls: list[tuple[float, int] | None] = [None] * len(mine)
    if compute_perplexity:
        totals, counts = response_nll(
            model, processor, my_contexts, [references[i] for i in mine], with_knowledge=with_knowledge,
            batch_size=batch_size, progress=progress and state.is_main_process,
        )
        nlls = list(zip(totals, counts, strict=True))
    gathered = gather_object(list(zip(mine, hypotheses, nlls, strict=True)))
    if not state.is_main_process:
        return None
    by_index = {index: (hypothesis, nll) for index, hypothesis, nll in gathered}
    hypotheses = [by_index[i][0] for i in range(len(dialogues))]
    ppl = dict.fromkeys(PPL_CONVENTIONS.values())
    if compute_perplexity:
        ppl = perplexities([by_index[i][1][0] for i in range(len(dialogues))], [by_index[i][1][1] for i in range(len(dialogues))])
    return score_responses(contexts, references, hypotheses, ppl, glove_path)
