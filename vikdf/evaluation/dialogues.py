"""Zero-resource dialogue evaluation of VIKDF (paper §3.4.2 inference, §4.4 metrics, Table 1; conventions:
README, "Conventions and where we differ from the release").

The pieces `eval_dialogue.py` and the demo share:

- :func:`generate_responses`: batched generation with left padding and the checkpoint's generation config (for a
  VIKDF checkpoint the released settings, `modeling_vikdf.paper_generation_config`). Padding is masked, so a batch
  gives the same hypotheses as batch size 1 (tested in fp32; in bf16, kernels that change with the batch shape can
  flip near-ties). Batches group contexts of similar length (less padding); outputs come back in input order.
- :func:`response_nll` / :func:`perplexities`: NLL of the reference responses (response tokens and eos only, the
  processor's ``labels``). PPL, the Table-1 column, follows the release: exp of the mean over dialogues of
  each dialogue's mean token NLL; ``ppl_token`` = exp(total NLL / total tokens) is reported next to it.
- :func:`evaluate_dialogues`: both, plus every other Table-1 metric through
  :func:`vikdf.evaluation.dialogue_metrics.compute_dialogue_metrics`, in one process or split over the processes of
  ``accelerate launch`` (:func:`rank_share`).
- :func:`write_evaluation`, :func:`metrics_markdown`, :func:`aggregate_metrics`: the files a run leaves behind and
  the mean ± std / one-sided one-sample t-test summary over seeded runs (paper §5.1, via :mod:`vikdf.evaluation.stats`).

``with_knowledge=False`` is the frozen-LLM baseline (and the LoRA baseline of Table 4): the same chat template
without knowledge slots and without CLIP inputs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers.utils import logging

from modeling_vikdf import PAPER_GENERATION, VIKDFForConditionalGeneration
from processing_vikdf import IGNORE_INDEX, Context, VIKDFProcessor
import vikdf.auto  # noqa: F401  (the Auto classes know VIKDF checkpoints)
from vikdf.checks import load_checkpoint_config
from vikdf.data.files import read_json
from vikdf.training.losses import next_token_positions
from vikdf.evaluation.stats import aggregate_runs, format_markdown_table, significance_mark

logger = logging.get_logger(__name__)

# Table 1 column order: (key in metrics.json, column title).
TABLE1_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ppl", "PPL"),
    ("bleu_1", "BLEU-1"),
    ("rouge_l", "ROUGE-L"),
    ("embedding_average", "Average"),
    ("vector_extrema", "Extrema"),
    ("greedy_matching", "Greedy"),
    ("distinct_1", "Dis-1"),
    ("distinct_2", "Dis-2"),
)
# Reported next to Table 1: PPL over all tokens of the test set, exp(Σ NLL / Σ tokens), the figure that does not
# weight short responses up.
EXTRA_COLUMNS: tuple[tuple[str, str], ...] = (("ppl_token", "token-level PPL"),)
# Every metric in metrics.json, in this order.
METRIC_KEYS = tuple(key for key, _ in TABLE1_COLUMNS + EXTRA_COLUMNS)
_TITLE_TO_KEY = {title.lower(): key for key, title in TABLE1_COLUMNS + EXTRA_COLUMNS}
# Where lower is better; the significance test of every other metric asks whether it is higher (paper §5.1).
LOWER_IS_BETTER = ("ppl", "ppl_token")
# The PPL figures of :func:`perplexities`: the release's per-dialogue mean, then the token-level one.
PPL_KEYS = ("ppl", "ppl_token")


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None, quantization_config=None
) -> tuple[VIKDFForConditionalGeneration, VIKDFProcessor]:
    """A VIKDF checkpoint (folder or hub id) and its processor, with the local classes (no remote code runs).

    The folder, its config and its weight files are checked first (`vikdf.checks.load_checkpoint_config`). A
    bitsandbytes `quantization_config` quantises the LLM alone; a checkpoint saved quantised loads quantised.
    """
    load_checkpoint_config(os.fspath(path), flag="checkpoint")
    model = VIKDFForConditionalGeneration.from_pretrained(path, dtype=dtype, quantization_config=quantization_config)
    processor = VIKDFProcessor.from_pretrained(path)
    if processor.num_query_tokens != model.config.num_query_tokens:
        raise ValueError(
            f"{path}: the processor writes {processor.num_query_tokens} knowledge slots but the model has "
            f"{model.config.num_query_tokens} queries."
        )
    return model, processor


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _length_order(contexts: Sequence[Context]) -> list[int]:
    """Indices from the longest context to the shortest: batches of similar length need little padding, and
    the longest batch comes first, so running out of memory shows at once."""
    return sorted(range(len(contexts)), key=lambda i: -len(VIKDFProcessor.join_context(contexts[i])))


def _batches(order: list[int], batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


# ----------------------------------------------------------------------------------------------------------------
# Generation and perplexity
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_responses(
    model,
    processor: VIKDFProcessor,
    contexts: Sequence[Context],
    *,
    with_knowledge: bool = True,
    batch_size: int = 16,
    seed: int | None = None,
    progress: bool = True,
    **generate_kwargs,
) -> list[str]:
    """Responses to `contexts` (strings or lists of turns), in input order (paper §3.4.2).

    Context → CLIP text tower → IQ-Former → `K` → LLM → response; `generate_kwargs` override the checkpoint's
    generation config. `seed` seeds sampling (`do_sample=True`); sampled outputs depend on the batch composition,
    deterministic beam search does not.
    """
    settings = dict(generate_kwargs)
    tokenizer = processor.tokenizer
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    settings.setdefault("eos_token_id", tokenizer.eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    device = model.device
    responses: list[str | None] = [None] * len(contexts)
    with tqdm(total=len(contexts), desc="Generating", unit="dialogue", disable=not progress) as bar:
        for indices in _batches(_length_order(contexts), batch_size):
            batch = _to_device(processor.dialogue_batch([contexts[i] for i in indices], with_knowledge=with_knowledge), device)
            generated = model.generate(**batch, **settings)
            for index, text in zip(indices, processor.decode_responses(generated, batch["input_ids"].shape[1])):
                responses[index] = text
            bar.update(len(indices))
    return responses  # type: ignore[return-value]


@torch.no_grad()
def response_nll(
    model,
    processor: VIKDFProcessor,
    contexts: Sequence[Context],
    responses: Sequence[str],
    *,
    with_knowledge: bool = True,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[list[float], list[int]]:
    """Per dialogue, in input order: summed NLL (nats) of its reference response given its context, and the
    number of tokens scored.

    Scored tokens are those the processor labels: the response and the end-of-sequence token, never the prompt,
    the knowledge slots or padding. Evaluation across processes gathers these per-dialogue values.
    """
    if len(contexts) != len(responses):
        raise ValueError(f"Got {len(contexts)} contexts but {len(responses)} responses.")
    model.eval()
    device = model.device
    totals, counts = [0.0] * len(contexts), [0] * len(contexts)
    order = _length_order(contexts)
    with tqdm(total=len(contexts), desc="Perplexity", unit="dialogue", disable=not progress) as bar:
        for indices in _batches(order, batch_size):
            batch = processor.dialogue_batch(
                [contexts[i] for i in indices], [responses[i] for i in indices], with_knowledge
            )
            labels = batch.pop("labels").to(device)
            # Position t predicts token t+1; the LM head runs on the scored positions only, scored in fp32.
            positions = next_token_positions(labels)
            logits = model(**_to_device(batch, device), logits_positions=positions, use_cache=False).logits  # (M, V)
            targets = labels[:, 1:]
            scored = targets != IGNORE_INDEX
            nll = F.cross_entropy(logits.float(), targets[scored], reduction="none")
            per_row = torch.zeros(len(indices), dtype=torch.float64, device=nll.device)
            per_row.index_add_(0, scored.nonzero()[:, 0], nll.double())
            for row, index in enumerate(indices):
                totals[index] = per_row[row].item()
                counts[index] = int(scored[row].sum().item())
            bar.update(len(indices))
    return totals, counts


def perplexities(totals: Sequence[float], counts: Sequence[int]) -> dict[str, float]:
    """Both PPL figures from per-dialogue summed NLLs and token counts (:func:`response_nll`).

    ``ppl`` is the release's: ``inference.py`` runs with ``per_device_eval_batch_size=1``
    (``scripts/run_inference.sh``), takes each dialogue's mean token loss and reports exp of their mean, so
    every dialogue weighs the same. ``ppl_token`` = exp(Σ NLL / Σ tokens) weighs every token the same.
    """
    if not counts:
        raise ValueError("No dialogues to score.")
    empty = [i for i, count in enumerate(counts) if count == 0]
    if empty:
        raise ValueError(f"Dialogues {empty[:10]} have no response token to score; are their references empty?")
    per_dialogue = [total / count for total, count in zip(totals, counts)]
    return {
        "ppl": math.exp(math.fsum(per_dialogue) / len(per_dialogue)),
        "ppl_token": math.exp(math.fsum(totals) / sum(counts)),
    }


# ----------------------------------------------------------------------------------------------------------------
# Whole evaluation
# ----------------------------------------------------------------------------------------------------------------
def _field(record: Any, name: str) -> Any:
    return record[name] if isinstance(record, Mapping) else getattr(record, name)


def _context(record: Any) -> Context:
    """A record's context as the predictions keep it: a string as it is, turns (or chat messages) as a list of turns."""
    context = _field(record, "context")
    return context if isinstance(context, str) else VIKDFProcessor.context_turns(context)


def checkpoint_generation(model, **overrides: Any) -> dict[str, Any]:
    """The decoding settings `model.generate` runs with: its generation config's values of the released settings'
    keys (beam width, blocked n-grams, length, sampling), `overrides` on top; what an evaluation records."""
    return {**{key: getattr(model.generation_config, key) for key in PAPER_GENERATION}, **overrides}


def rank_share(contexts: Sequence[Context], batch_size: int, rank: int, world_size: int) -> list[int]:
    """Indices of the dialogues rank `rank` evaluates: whole single-process batches b with b mod world_size = rank,
    in the single-process order (so that the rank's own batching rebuilds exactly those batches)."""
    batches = list(_batches(_length_order(contexts), batch_size))
    return [index for b, batch in enumerate(batches) if b % world_size == rank for index in batch]


def evaluate_dialogues(
    model,
    processor: VIKDFProcessor,
    dialogues: Sequence[Any],
    *,
    state: PartialState | None = None,
    with_knowledge: bool = True,
    glove_path: str | os.PathLike | None = None,
    batch_size: int = 16,
    compute_perplexity: bool = True,
    seed: int | None = None,
    progress: bool = True,
    **generate_kwargs,
) -> dict[str, Any] | None:
    """Generate for every dialogue and score against its reference: the automatic evaluation of §4.4.

    With the `state` of `accelerate launch --num_processes N`, the test set is cut into the batches one process
    would run and batch b goes to rank b mod N (:func:`rank_share`), each rank on its own device. Every dialogue is
    thus generated and scored in the very batch it would have been in alone, so hypotheses and per-dialogue NLLs are
    bitwise those of one process (sampling aside: `do_sample` draws depend on which batches a process runs). Rank 0
    gathers them in test-set order and scores them as one process would; the other ranks return None.

    Args:
        dialogues: objects or dicts with `context` (turns) and `response` (the reference), e.g. from
            `vikdf.data.dialogue.load_dialogues`.
        with_knowledge: False evaluates the LLM alone with the same chat template (baselines).
        glove_path: GloVe text file for Average / Extrema / Greedy; without it these are None.
        generate_kwargs: override the checkpoint's generation config.

    Returns:
        ``{"metrics": {ppl, bleu_1, ..., distinct_2, ppl_token} in :data:`METRIC_KEYS` order, "predictions":
        [{"context", "reference", "hypothesis"}, ...], "tokenizer": the word tokeniser of BLEU/ROUGE/embeddings}``.
    """
    if not dialogues:
        raise ValueError("No dialogues to evaluate.")
    rank, world_size = (0, 1) if state is None else (state.process_index, state.num_processes)
    progress = progress and rank == 0
    contexts = [_context(d) for d in dialogues]
    references = [_field(d, "response") for d in dialogues]
    mine = rank_share(contexts, batch_size, rank, world_size)
    if state is not None:
        logger.info(f"Process {rank} of {world_size}: {len(mine)} of {len(dialogues)} dialogues.")
    my_contexts = [contexts[i] for i in mine]
    hypotheses = generate_responses(
        model, processor, my_contexts, with_knowledge=with_knowledge, batch_size=batch_size, seed=seed,
        progress=progress, **generate_kwargs,
    )
    nlls: list[tuple[float, int] | None] = [None] * len(mine)
    if compute_perplexity:
        totals, counts = response_nll(
            model, processor, my_contexts, [references[i] for i in mine], with_knowledge=with_knowledge,
            batch_size=batch_size, progress=progress,
        )
        nlls = list(zip(totals, counts, strict=True))
    shares = list(zip(mine, hypotheses, nlls, strict=True))
    if state is not None:
        shares = gather_object(shares)
        if not state.is_main_process:
            return None
    by_index = {index: (hypothesis, nll) for index, hypothesis, nll in shares}
    hypotheses = [by_index[i][0] for i in range(len(dialogues))]
    ppl = dict.fromkeys(PPL_KEYS)
    if compute_perplexity:
        ppl = perplexities(*zip(*(by_index[i][1] for i in range(len(dialogues)))))
    return score_responses(contexts, references, hypotheses, ppl, glove_path)


def score_responses(
    contexts: Sequence[Context],
    references: Sequence[str],
    hypotheses: Sequence[str],
    ppl: Mapping[str, float | None],
    glove_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The result of :func:`evaluate_dialogues` from its parts (`ppl`: :func:`perplexities`, or None values): the
    metrics and the predictions."""
    # evaluate, NLTK and pycocoevalcap are imported only when scoring.
    from vikdf.evaluation.dialogue_metrics import compute_dialogue_metrics

    scores = compute_dialogue_metrics(hypotheses, references, glove_path=glove_path)
    metrics = {key: ppl[key] if key in ppl else scores.get(key) for key in METRIC_KEYS}
    predictions = [
        {"context": context, "reference": reference, "hypothesis": hypothesis}
        for context, reference, hypothesis in zip(contexts, references, hypotheses)
    ]
    return {"metrics": metrics, "predictions": predictions, "tokenizer": scores["tokenizer"]}


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------
def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def metrics_markdown(
    metrics: Mapping[str, float | None], digits: int = 2, label: tuple[str, str] | None = None
) -> str:
    """A one-row markdown table with the columns of Table 1; missing metrics print as "–".

    `label` = (column title, cell) adds a leading column, e.g. ("Test set", "image_chat/test.json").
    """
    titles = [title for _, title in TABLE1_COLUMNS]
    cells = [_cell(metrics.get(key), digits) for key, _ in TABLE1_COLUMNS]
    if label is not None:
        titles.insert(0, label[0])
        cells.insert(0, label[1])
    return "\n".join(
        ["| " + " | ".join(titles) + " |", "|" + " --- |" * len(titles), "| " + " | ".join(cells) + " |"]
    ) + "\n"


def metrics_notes(metrics: Mapping[str, float | None], tokenizer: str | None = None, digits: int = 2) -> str:
    """What the numbers of :func:`metrics_markdown` mean: the PPL convention, the token-level PPL and the word
    tokeniser that BLEU, ROUGE and the embedding metrics saw."""
    notes = [
        "PPL: exp of the mean over dialogues of each response's mean token NLL (response tokens and eos), as "
        f"released; token-level PPL exp(total NLL / tokens): {_cell(metrics.get('ppl_token'), digits)}."
    ]
    if tokenizer is not None:
        notes.append(f"Word tokeniser of BLEU, ROUGE and the embedding metrics: {tokenizer}.")
    return "\n".join(notes) + "\n"


def write_evaluation(output_dir: str | os.PathLike, result: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> Path:
    """Write `predictions.jsonl`, `metrics.json`, `metrics.md` (the Table-1 row and :func:`metrics_notes`) and,
    when `info` is given, `eval_info.json` (with the word tokeniser of the result)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for record in result["predictions"]:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(dict(result["metrics"]), indent=2) + "\n", encoding="utf-8")
    tokenizer = result.get("tokenizer")
    notes = metrics_notes(result["metrics"], tokenizer)
    (out / "metrics.md").write_text(metrics_markdown(result["metrics"]) + "\n" + notes, encoding="utf-8")
    if info is not None:
        info = {**info, "tokenizer": tokenizer}
        (out / "eval_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    return out


def normalise_metric_keys(metrics: Mapping[str, Any], source: str = "metrics") -> dict[str, float | None]:
    """Map Table-1 titles ("PPL", "BLEU-1", ..., "token-level PPL") or our keys ("ppl", ...) onto our keys.

    Accepts a flat dict or one nested under "metrics"; unknown keys are ignored with a warning.
    """
    if "metrics" in metrics and isinstance(metrics["metrics"], Mapping):
        metrics = metrics["metrics"]
    normalised: dict[str, float | None] = {}
    for name, value in metrics.items():
        key = name if name in METRIC_KEYS else _TITLE_TO_KEY.get(str(name).lower())
        if key is None:
            logger.warning(f"{source}: ignoring unknown metric {name!r}; known: {', '.join(METRIC_KEYS)}.")
            continue
        if value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"{source}: metric {name!r} is {value!r}, not a number or null.")
        normalised[key] = None if value is None else float(value)
    return normalised


def load_metrics_json(path: str | os.PathLike) -> dict[str, float | None]:
    """A metrics file (ours, or a hand-written reference with Table-1 titles) as {key: value}."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Metrics file not found: {path!r}.")
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object of metric values, found {type(data).__name__}.")
    return normalise_metric_keys(data, source=path)


def tokenizer_of_run(metrics_path: str | os.PathLike) -> str | None:
    """The word tokeniser recorded in the `eval_info.json` next to a run's `metrics.json` (None when not recorded)."""
    info_path = Path(metrics_path).with_name("eval_info.json")
    if not info_path.is_file():
        return None
    info = read_json(info_path)
    return info.get("tokenizer") if isinstance(info, Mapping) else None


def aggregate_metrics(
    runs: Sequence[Mapping[str, float | None]], reference: Mapping[str, float | None] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """Mean, std and one-sample t-test against `reference` per metric, in :data:`METRIC_KEYS` order (paper §5.1).

    The test is one-sided towards improvement (:data:`LOWER_IS_BETTER` for PPL, higher for the rest), so its p
    marks only results better than the reference, as the paper's "significant improvements".
    """
    summary = aggregate_runs(
        [{k: run.get(k) for k in METRIC_KEYS if k in run} for run in runs], reference, lower_is_better=LOWER_IS_BETTER
    )
    return {key: summary[key] for key in METRIC_KEYS if key in summary}


def summary_markdown(
    summary: Mapping[str, Mapping[str, float | int | None]],
    digits: int = 2,
    alpha: float = 0.05,
    tokenizers: Sequence[str | None] = (),
) -> str:
    """One Table-1 row of "mean ± std", then the per-metric details (all metrics, token-level PPL too) and the
    word tokenisers of the runs (:func:`tokenizer_of_run`), when given.

    A cell with a test shows its one-sided p; * marks a significant improvement (p < alpha), as in Table 1.
    """
    cells = []
    for key, title in TABLE1_COLUMNS:
        row = summary.get(key)
        if row is None or row["mean"] is None:
            cells.append("–")
            continue
        cell = f"{row['mean']:.{digits}f}"
        if row["std"] is not None:
            cell += f" ± {row['std']:.{digits}f}"
        cell += significance_mark(row, alpha)
        if row["p"] is not None:
            cell += f" (p = {row['p']:.3g})"
        cells.append(cell)
    titles = [title for _, title in TABLE1_COLUMNS]
    table = "\n".join(["| " + " | ".join(titles) + " |", "|" + " --- |" * len(titles), "| " + " | ".join(cells) + " |"])
    details = format_markdown_table(summary, digits=digits, alpha=alpha)
    if tokenizers:
        names = ", ".join(dict.fromkeys(name or "not recorded" for name in tokenizers))
        details += f"\nWord tokeniser of BLEU, ROUGE and the embedding metrics in these runs: {names}.\n"
    return table + "\n\n" + details


__all__ = [
    "TABLE1_COLUMNS",
    "EXTRA_COLUMNS",
    "METRIC_KEYS",
    "LOWER_IS_BETTER",
    "checkpoint_generation",
    "load_checkpoint",
    "generate_responses",
    "response_nll",
    "perplexities",
    "rank_share",
    "evaluate_dialogues",
    "score_responses",
    "metrics_markdown",
    "metrics_notes",
    "write_evaluation",
    "normalise_metric_keys",
    "load_metrics_json",
    "tokenizer_of_run",
    "aggregate_metrics",
    "summary_markdown",
]
