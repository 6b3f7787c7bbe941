"""Hub model cards (README.md) for VIKDF dialogue checkpoints.

`write_model_card` writes the card a training run leaves next to the weights: metadata (base model, licence,
datasets, pipeline tag, library, tags), what the checkpoint is (paper §3.4: knowledge distilled from the dialogue
context alone, or the Table-4 LoRA baseline without knowledge) and its LLM, CLIP and BERT bases, a "how to
generate" snippet (the remote-code text-generation pipeline of `pipeline_vikdf.py`), and an evaluation section.
`update_model_card_metrics` fills that section with a Table-1 row per test set after `eval_dialogue.py`, and the
metadata's `model-index` with the same numbers as `EvalResult`s, which the Hub reads (evaluating the same set again
replaces its row and results). Local folders are named by their last component only. Nothing here touches the
network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from configuration_vikdf import DIALOGUE_METHODS
from modeling_vikdf import PAPER_GENERATION
from vikdf.atomic import write_text_atomic
from vikdf.evaluation.dialogues import EXTRA_COLUMNS, TABLE1_COLUMNS, metrics_markdown
from vikdf.training.quantization import checkpoint_quantization

logger = logging.get_logger(__name__)

METRICS_START = "<!-- vikdf:metrics:start -->"
METRICS_END = "<!-- vikdf:metrics:end -->"
NO_METRICS = "_No evaluation has been run yet: `python eval_dialogue.py --model_name_or_path <this folder> ...` adds it._"
METRICS_NOTE = (
    "Automatic metrics of the paper's Table 1 (§4.4): PPL on the reference responses (response tokens and eos), "
    "exp of the mean over dialogues of each response's mean token NLL, as released; all other metrics ×100; "
    "\"–\" = not computed (embedding metrics need a GloVe file that knows some test word). Tokeniser: the word "
    "tokeniser of BLEU, ROUGE and the embedding metrics, the released one being `nltk.word_tokenize (punkt_tab)`."
)
TOKENIZER_COLUMN = "Tokeniser"
PAPER = (
    "Distilling Implicit Multimodal Knowledge into Large Language Models for Zero-Resource Dialogue Generation"
)
# The paper text gives no arXiv id; the link finds it by its title.
PAPER_URL = "https://arxiv.org/search/?searchtype=title&query=" + "+".join(PAPER.split())
# Hub licence names of the base LLM families, matched in order against the lower-cased LLM name.
LICENSES = (("llama-2", "llama2"), ("llama2", "llama2"), ("llama-3", "llama3"), ("qwen2", "apache-2.0"), ("mistral", "apache-2.0"))
TASK = "text-generation"  # the pipeline tag, and the task `pipeline_vikdf.py` registers
PLACEHOLDER_REPO = "path/to/this/checkpoint"  # in the snippets when the card does not know its hub id
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def base_model_from_config(config) -> str | None:
    """The LLM's hub id or folder as the checkpoint's config remembers it (`text_config._name_or_path`)."""
    text_config = getattr(config, "text_config", None)
    name = getattr(text_config, "_name_or_path", None) or getattr(text_config, "name_or_path", None)
    return name or None


def looks_like_hub_id(name: str | None) -> bool:
    """True for `org/name` or `name`, False for local folders (which the Hub's `base_model` field rejects)."""
    return bool(name) and not os.path.isabs(name) and not os.path.exists(name) and bool(_HUB_ID.match(name))


def component_names_from_config(config) -> dict[str, str | None]:
    """The CLIP and BERT the checkpoint was built from, as its config remembers them (`vikdf.training.components`), and how
    its LLM is stored ("none", "8bit" or "4bit": `vikdf.training.quantization.checkpoint_quantization`)."""
    names = {}
    for key, attribute in (("clip_model", "clip_config"), ("bert_model", "qformer_config")):
        sub = getattr(config, attribute, None)
        names[key] = getattr(sub, "_name_or_path", None) or None
    names["llm_quantization"] = checkpoint_quantization(config)
    return names


def default_license(base_model: str | None) -> str | None:
    """The Hub licence name of the base LLM's family (`llama2` for Llama-2, `apache-2.0` for Qwen2.5, Mistral)."""
    name = os.path.basename(base_model or "").lower()
    return next((license for key, license in LICENSES if key in name), None)


def _shown(name: str | None, missing: str) -> str:
    """A model as the card's text shows it: a hub id as it is, a local folder by its last component only."""
    if not name:
        return missing
    return f"`{name}`" if looks_like_hub_id(name) else f"`{os.path.basename(os.path.normpath(name))}` (a local folder)"


def eval_results(metrics: Mapping[str, float | None], test_name: str) -> list[EvalResult]:
    """The metrics of one test set (Table 1 and the token-level PPL) as Hub `EvalResult`s (model-index); missing
    metrics are left out."""
    return [
        EvalResult(
            task_type=TASK, dataset_type=test_name, dataset_name=test_name, metric_type=key, metric_name=title,
            metric_value=float(metrics[key]),
        )
        for key, title in TABLE1_COLUMNS + EXTRA_COLUMNS
        if metrics.get(key) is not None
    ]


def _pipeline_usage(repo: str, method: str) -> str:
    knowledge = "" if method == "lora" else ", return_knowledge=True"
    answer = '{"generated_text": ...}' if method == "lora" else '{"generated_text": ..., "knowledge": ...}'
    return f"""```python
from transformers import pipeline

chat = pipeline("{TASK}", model="{repo}", trust_remote_code=True)
context = ["what a beautiful sky tonight.", "i always wonder what is up there."]  # turns, oldest first
print(chat(context{knowledge}))  # {answer}
```"""


def _usage(repo: str, method: str) -> str:
    if method == "lora":
        inputs = (
            "# The LoRA baseline (Table 4) reads no knowledge: the LLM's chat template only, left padded.\n"
            "inputs = processor.dialogue_inputs(contexts, with_knowledge=False)"
        )
    else:
        inputs = "inputs = processor(text=contexts)  # chat template with knowledge slots + CLIP inputs, left padded"
    return f"""```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)

contexts = [["what a beautiful sky tonight.", "i always wonder what is up there."]]  # turns, oldest first
{inputs}
outputs = model.generate(**inputs)  # decodes as the checkpoint's generation_config.json says (the released settings)
print(processor.decode_responses(outputs, inputs["input_ids"].shape[1]))
```"""


def _description(
    base_model: str | None,
    method: str,
    train_file: str | None,
    train_fraction: float | None,
    clip_model: str | None = None,
    bert_model: str | None = None,
    llm_quantization: str = "none",
) -> str:
    llm = _shown(base_model, "an unnamed LLM")
    if method == "lora":
        what = (
            f"the LoRA baseline of the paper's Table 4: {llm} fine-tuned with LoRA (merged into the weights) on "
            "dialogue text, **without** visual implicit knowledge."
        )
    else:
        what = (
            f"a VIKDF model (Visual Implicit Knowledge Distillation Framework): an IQ-Former distils visual implicit "
            f"knowledge `K` from the dialogue context alone through a frozen CLIP text tower, and the frozen LLM "
            f"{llm} reads `K` as soft prompts to generate the response, P(R | C, K) (paper §3.4). No image is "
            "needed at inference."
        )
    if train_fraction == 0:
        # The paper's "Zero Data" row (‡) is the Reddit-tuned checkpoint tested on Image-Chat, not this one.
        tuning = "No dialogue fine-tuning (`--train_fraction 0`): the given checkpoint, re-saved for inference."
    elif train_file is None:
        tuning = "Dialogue fine-tuning: not recorded in this card."
    else:
        share = "all" if train_fraction is None or train_fraction >= 1 else f"{train_fraction:g}"
        trained = "LoRA adapters on the LLM" if method == "lora" else "the queries, IQ-Former and language projection"
        tuning = f"Dialogue fine-tuning on {share} of `{os.path.basename(train_file)}`: {trained} trained, the rest frozen."
    bases = f"- Base LLM: {llm}\n- CLIP (frozen text tower): {_shown(clip_model, 'not recorded')}\n"
    bases += f"- BERT (initialises the IQ-Former): {_shown(bert_model, 'not recorded')}"
    if llm_quantization != "none":
        # The frozen LLM's layers are stored packed by bitsandbytes: loading needs it, and outputs differ a little
        # from the full-precision LLM's.
        bases += (f"\n- The frozen LLM's layers are stored in {llm_quantization.replace('bit', '-bit')} (bitsandbytes): "
                  "loading needs `pip install bitsandbytes`; responses differ slightly from the full-precision LLM's.")
    return f"This is {what}\n\n{bases}\n- {tuning}"


def build_model_card(
    *,
    base_model: str | None,
    method: str = "vikdf",
    train_file: str | None = None,
    train_fraction: float | None = 1.0,
    datasets: Sequence[str] | None = None,
    model_id: str | None = None,
    license: str | None = None,
    metrics_block: str | None = None,
    clip_model: str | None = None,
    bert_model: str | None = None,
    llm_quantization: str = "none",
    results: Sequence[EvalResult] | None = None,
) -> ModelCard:
    """A VIKDF model card. `base_model` goes into the metadata only when it is a hub id; the licence defaults to
    the base LLM family's (`default_license`); `results` fill the metadata's model-index."""
    if method not in DIALOGUE_METHODS:
        raise ValueError(f"method={method!r}; choose one of {DIALOGUE_METHODS}.")
    if base_model and not looks_like_hub_id(base_model):
        logger.info(f"Base model {base_model!r} is a local path; the card's `base_model` metadata is left empty.")
    data = ModelCardData(
        base_model=base_model if looks_like_hub_id(base_model) else None,
        datasets=list(datasets) if datasets else None,
        language="en",
        license=license or default_license(base_model),
        library_name="transformers",
        pipeline_tag=TASK,
        model_name=model_id or "VIKDF",
        eval_results=list(results) if results else None,
        tags=["vikdf", "dialogue", "zero-resource", "custom_code"] + (["lora"] if method == "lora" else [])
        + ([llm_quantization, "bitsandbytes"] if llm_quantization != "none" else []),
    )
    title = "VIKDF LoRA baseline" if method == "lora" else "VIKDF"
    repo = model_id or PLACEHOLDER_REPO
    body = f"""
# {title}: zero-resource dialogue generation

{_description(base_model, method, train_file, train_fraction, clip_model, bert_model, llm_quantization)}

Paper: [*{PAPER}*]({PAPER_URL}).

## How to generate

The checkpoint's remote code registers a text-generation pipeline that runs the whole VIKDF path (context → CLIP
text tower → IQ-Former → knowledge → LLM) with the paper's decoding (beam {PAPER_GENERATION["num_beams"]}, no repeated \
{PAPER_GENERATION["no_repeat_ngram_size"]}-grams, {PAPER_GENERATION["max_new_tokens"]} new tokens):

{_pipeline_usage(repo, method)}

The same with the model and processor:

{_usage(repo, method)}

Evaluate with `eval_dialogue.py` of the VIKDF code (the automatic metrics of the paper's Table 1):

```bash
python eval_dialogue.py --model_name_or_path {repo} --test_file image_chat/test.json --output_dir eval/
```

## Evaluation

{METRICS_START}
{metrics_block or NO_METRICS}
{METRICS_END}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(directory: str | os.PathLike, **kwargs) -> Path:
    """Write `build_model_card(**kwargs)` to `directory/README.md` (whole or not at all) and return the path."""
    path = Path(directory) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, str(build_model_card(**kwargs)))


def _rows(block: str) -> dict[str, str]:
    """Existing table rows of a metrics block (after the header and separator), keyed by the test set cell."""
    table = [line.strip() for line in block.splitlines() if line.strip().startswith("|")]
    return {line.strip("|").split("|")[0].strip(): line for line in table[2:]}


def metrics_block(rows: Mapping[str, str]) -> str:
    """The evaluation section: a note and a Table-1 table with one row per test set and its tokeniser."""
    titles, separator = metrics_markdown({}, label=("Test set", "")).splitlines()[:2]
    header = [f"{titles} {TOKENIZER_COLUMN} |", f"{separator} --- |"]
    return "\n".join([METRICS_NOTE, "", *header, *rows.values()])


def update_model_card_metrics(
    directory: str | os.PathLike,
    metrics: Mapping[str, float | None],
    test_name: str,
    config=None,
    tokenizer: str | None = None,
) -> Path:
    """Put a Table-1 row for `test_name` into the card of checkpoint folder `directory` (rewriting README.md), and
    its metrics into the metadata's model-index (`eval_results`), replacing those of an earlier run on that set.

    `tokenizer` names the word tokeniser behind BLEU/ROUGE/embeddings (the evaluation result's "tokenizer").
    A folder without a VIKDF card gets a fresh one (bases from `config`, when given).
    """
    path = Path(directory) / "README.md"
    row = metrics_markdown(metrics, label=("Test set", test_name)).splitlines()[-1] + f" {tokenizer or '–'} |"
    results = eval_results(metrics, test_name)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if METRICS_START in text and METRICS_END in text:
        head, rest = text.split(METRICS_START, 1)
        block, tail = rest.split(METRICS_END, 1)
        rows = _rows(block)
        rows[test_name] = row
        card = ModelCard(f"{head}{METRICS_START}\n{metrics_block(rows)}\n{METRICS_END}{tail}")
        kept = [r for r in card.data.eval_results or [] if r.dataset_name != test_name]
        card.data.eval_results = kept + results
        card.data.model_name = card.data.model_name or "VIKDF"
        return write_text_atomic(path, str(card))
    if text:
        logger.warning(f"{path} has no VIKDF evaluation section; writing a new VIKDF card in its place.")
    return write_model_card(
        directory,
        base_model=base_model_from_config(config) if config is not None else None,
        **(component_names_from_config(config) if config is not None else {}),
        method=config.dialogue_method if config is not None else "vikdf",
        train_file=None,
        train_fraction=None,
        metrics_block=metrics_block({test_name: row}),
        results=results,
    )


__all__ = [
    "TABLE1_COLUMNS",
    "base_model_from_config",
    "build_model_card",
    "write_model_card",
    "update_model_card_metrics",
    "looks_like_hub_id",
    "component_names_from_config",
    "default_license",
    "eval_results",
]
