"""Zero-resource evaluation of a VIKDF dialogue checkpoint: generation + the automatic metrics of Table 1 (paper §4.4).

    python eval_dialogue.py --model_name_or_path runs/vikdf-reddit --test_file image_chat/test.json \
        --glove_path glove.6B.300d.txt --output_dir runs/eval-imagechat-zero-data
    python eval_dialogue.py ... --baseline llm        # the frozen LLM alone, same chat template, no knowledge
    python eval_dialogue.py ... --knowledge_ablation shuffle   # each dialogue gets another's knowledge (or: zero)
    python eval_dialogue.py --aggregate s1/metrics.json s2/metrics.json ... --reference_json best_baseline.json \
        --output_dir runs/eval-5-seeds                 # mean ± std, one-sided one-sample t-tests (paper §5.1)

The paper's Table-1 rows: Reddit = the Reddit checkpoint on the Reddit test set (`--context_turns 2,3`, as the
release's reader keeps only those dialogues); Image-Chat = the Image-Chat checkpoints (tuned from the Reddit one on
1, 1/4 or 1/8 of Image-Chat) on Image-Chat's test set; "Zero Data" (‡) = the Reddit checkpoint on Image-Chat's test
set, as in the command above.

Writes `predictions.jsonl` (context, reference, hypothesis), `metrics.json`, `metrics.md` (one Table-1 row, then
the PPL convention, the token-level PPL and the word tokeniser) and `eval_info.json` into `--output_dir`; with
`--textualise N` also `knowledge.jsonl`, the knowledge distilled from the first N contexts put into words by the
LLM (paper §5.4, Fig. 6). Evaluating a local checkpoint folder
(not a baseline run) also writes the metrics row into its model card (README.md).

Decoding follows the checkpoint's generation config (a VIKDF checkpoint carries the released settings); the
decoding flags override it. Batches are left padded and give the same responses as batch size 1. The loop lives in
`vikdf.evaluation.dialogues`.

    accelerate launch --num_processes 4 eval_dialogue.py ...   # the dialogues split over 4 processes / GPUs

splits the test set by batches over the processes, each on its own device; rank 0 gathers the responses and
per-dialogue NLLs, computes the metrics and alone writes the files and the model card, identical to one process
(`vikdf.evaluation.dialogues.evaluate_dialogues`).
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser
from transformers.utils import logging

from vikdf.data.dialogue import FORMATS, load_dialogues, parse_turn_counts
from vikdf.defaults import KNOWLEDGE_ABLATIONS, PRECISIONS

# torch, the model and the metrics are imported once the flags are parsed, so that `--help` answers in a second.
logger = logging.get_logger("eval_dialogue")


@dataclass
class EvalArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "VIKDF checkpoint (folder or hub id) to evaluate; not needed with --aggregate."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Test dialogues: Image-Chat test.json, Reddit Conversation JSON or TSV."}
    )
    test_format: str = field(default="auto", metadata={"help": "Format of --test_file.", "choices": ["auto", *FORMATS]})
    test_name: str | None = field(
        default=None,
        metadata={
            "help": "Row label in the model card (default: the test file's folder/name), e.g. 'Image-Chat (Zero "
            "Data)' for the Reddit checkpoint on Image-Chat, the paper's ‡ row."
        },
    )
    max_context_turns: int | None = field(
        default=None, metadata={"help": "Truncate every context to its last N turns (the release truncates nothing)."}
    )
    context_turns: str | None = field(
        default=None,
        metadata={
            "help": "Keep only test dialogues whose context has one of these numbers of turns, e.g. 2,3 for the "
            "Reddit test set as the release read it; the others are dropped and counted in the log."
        },
    )
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip malformed test records instead of failing."})
    max_test_dialogues: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N test dialogues (quick checks)."}
    )
    output_dir: str = field(default="eval_output", metadata={"help": "Where predictions and metrics are written."})
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "llm: evaluate the checkpoint's frozen LLM alone (no knowledge, no CLIP inputs, same chat "
            "template), the paper's Llama-2 row. LoRA checkpoints are always evaluated this way.",
            "choices": ["llm"],
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Dialogues per generation / perplexity batch."})
    num_beams: int | None = field(
        default=None, metadata={"help": "Beam width (default: the checkpoint's generation config, as released)."}
    )
    no_repeat_ngram_size: int | None = field(
        default=None,
        metadata={"help": "Forbid repeated n-grams of this size, 0 = off (default: the checkpoint's generation config)."},
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Longest response in tokens (default: the checkpoint's generation config)."}
    )
    do_sample: bool = field(
        default=False, metadata={"help": "Sample instead of decoding as the checkpoint's generation config says."}
    )
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling top-p (with --do_sample)."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling (with --do_sample)."})
    glove_path: str | None = field(
        default=None, metadata={"help": "GloVe text file (glove.6B.300d.txt) for Average/Extrema/Greedy; else '–'."}
    )
    skip_perplexity: bool = field(default=False, metadata={"help": "Do not compute PPL on the reference responses."})
    precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on a GPU that has it, else fp32), bf16 or fp32.", "choices": list(PRECISIONS)}
    )
    device: str | None = field(default=None, metadata={"help": "Device to run on (default: cuda if available, else cpu)."})
    knowledge_ablation: str = field(
        default="none",
        metadata={
            "help": "Causal check of the knowledge: 'zero' writes zero soft prompts into the knowledge slots, "
            "'shuffle' gives each dialogue the knowledge of another dialogue in its batch; 'none' evaluates as trained.",
            "choices": list(KNOWLEDGE_ABLATIONS),
        },
    )
    textualise: int = field(
        default=0, metadata={"help": "Put the knowledge of the first N contexts into words (paper §5.4) → knowledge.jsonl."}
    )
    textualise_prompt: str | None = field(
        default=None, metadata={"help": "Caption prompt for --textualise (default: the model's first caption prompt)."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bars."})
    update_model_card: bool = field(
        default=True,
        metadata={"help": "Write the metrics row into a local checkpoint folder's README.md (not for --baseline runs)."},
    )
    aggregate: list[str] | None = field(
        default=None,
        metadata={"help": "Instead of evaluating: metrics.json files of repeated (seeded) runs to summarise."},
    )
    reference_json: str | None = field(
        default=None,
        metadata={"help": "With --aggregate: the best baseline's metrics to t-test against (our keys or Table-1 titles)."},
    )


def run_aggregate(args: EvalArguments) -> dict:
    """Mean ± std over runs and one-sample t-tests against the reference (paper §5.1) → aggregate.{json,md}."""
    from vikdf.evaluation.dialogues import aggregate_metrics, load_metrics_json, summary_markdown, tokenizer_of_run

    runs = [load_metrics_json(path) for path in args.aggregate]
    reference = load_metrics_json(args.reference_json) if args.reference_json else None
    summary = aggregate_metrics(runs, reference)
    tokenizers = [tokenizer_of_run(path) for path in args.aggregate]
    if len(set(tokenizers)) > 1:
        logger.warning(f"The runs were scored with different word tokenisers ({sorted(map(str, set(tokenizers)))}); "
                       "their BLEU/ROUGE/embedding numbers are not comparable.")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {"runs": args.aggregate, "tokenizers": tokenizers, "summary": summary}
    (out / "aggregate.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "aggregate.md").write_text(summary_markdown(summary, tokenizers=tokenizers), encoding="utf-8")
    logger.info(f"Aggregated {len(runs)} runs into {out / 'aggregate.md'}")
    return summary


def _test_name(args: EvalArguments) -> str:
    if args.test_name:
        return args.test_name
    path = Path(args.test_file)
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return name if args.max_test_dialogues is None else f"{name} (first {args.max_test_dialogues})"


def check_arguments(args: EvalArguments) -> None:
    """The flags alone, checked before any file is read or the model loads."""
    from vikdf.checks import check_device, check_positive

    for flag, value in (("--batch_size", args.batch_size), ("--num_beams", args.num_beams),
                        ("--max_test_dialogues", args.max_test_dialogues)):
        check_positive(value, flag)
    for flag, value in (("--no_repeat_ngram_size", args.no_repeat_ngram_size), ("--textualise", args.textualise)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} {value} must be 0 (off) or positive.")
    if args.do_sample and args.temperature is not None and not args.temperature > 0:
        raise ValueError(
            f"--temperature {args.temperature} with --do_sample must be above 0 (sampling divides the logits by it); "
            "for deterministic decoding leave --do_sample out."
        )
    if args.do_sample and args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p {args.top_p} with --do_sample must lie in (0, 1].")
    check_device(args.device)


def load_test_dialogues(args: EvalArguments, quantization) -> list:
    """Everything that can be wrong with a path or a flag, found before the model loads; then the test dialogues."""
    from vikdf.checks import check_glove_file, check_input_file, check_max_new_tokens, load_checkpoint_config
    from vikdf.training.quantization import check_quantization_request

    if args.model_name_or_path is None or args.test_file is None:
        raise ValueError("--model_name_or_path and --test_file are required (unless --aggregate).")
    config = load_checkpoint_config(args.model_name_or_path)
    check_quantization_request(quantization, config, args.model_name_or_path)
    if args.max_new_tokens is not None:  # the checkpoint's own length is checked once its generation config loads
        check_max_new_tokens(config, args.max_new_tokens)
    check_input_file(args.test_file, "--test_file")
    check_glove_file(args.glove_path)
    dialogues = load_dialogues(
        args.test_file, format=args.test_format, max_context_turns=args.max_context_turns,
        skip_bad=args.skip_bad_records, context_turns=parse_turn_counts(args.context_turns) if args.context_turns else None,
    )
    if args.max_test_dialogues is not None:
        dialogues = dialogues[: args.max_test_dialogues]
    if not dialogues:
        raise ValueError(f"{args.test_file}: no test dialogues.")
    return dialogues


def evaluated_system(args: EvalArguments, config) -> tuple[bool, str]:
    """Whether the run reads knowledge, and the system's name in the log and eval_info.json: VIKDF, the frozen LLM
    (--baseline llm) or the LoRA baseline, which was trained without knowledge (Table 4)."""
    with_knowledge = args.baseline is None and config.dialogue_with_knowledge
    lora = not config.dialogue_with_knowledge
    if lora and args.baseline is None:
        logger.info("LoRA baseline checkpoint (Table 4): evaluating without knowledge.")
    if args.knowledge_ablation != "none" and not with_knowledge:
        raise ValueError(
            f"--knowledge_ablation {args.knowledge_ablation} needs a VIKDF evaluation with knowledge; "
            f"{args.model_name_or_path} is evaluated without (--baseline or a LoRA checkpoint)."
        )
    system = "VIKDF" if with_knowledge else ("LoRA baseline" if lora else "frozen LLM")
    if args.knowledge_ablation != "none":
        system += f" (knowledge {args.knowledge_ablation})"
    return with_knowledge, system


def decoding_settings(args: EvalArguments, model) -> dict:
    """The decoding of the run: the checkpoint's generation config with the decoding flags given on top."""
    from vikdf.evaluation.dialogues import checkpoint_generation

    flags = {"num_beams": args.num_beams, "no_repeat_ngram_size": args.no_repeat_ngram_size,
             "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample or None}
    generation = checkpoint_generation(model, **{key: value for key, value in flags.items() if value is not None})
    if generation["do_sample"]:
        sampling = (("temperature", args.temperature), ("top_p", args.top_p))
        generation.update({key: value for key, value in sampling if value is not None})
    return generation


def write_textualised_knowledge(args: EvalArguments, model, processor, dialogues: list, generation: dict) -> None:
    """knowledge.jsonl: the knowledge of the first --textualise contexts put into words (paper §5.4), decoded
    deterministically with the run's beam width, n-gram block and length."""
    from pipeline_vikdf import textualise_knowledge
    from vikdf.evaluation.knowledge_ablation import knowledge_ablation

    chosen = dialogues[: args.textualise]
    decoding = {key: generation[key] for key in ("num_beams", "no_repeat_ngram_size", "max_new_tokens")}
    with knowledge_ablation(model, args.knowledge_ablation, seed=args.seed):
        texts = textualise_knowledge(
            model, processor, [list(d.context) for d in chosen], prompt=args.textualise_prompt,
            batch_size=args.batch_size, **decoding,
        )
    with open(Path(args.output_dir) / "knowledge.jsonl", "w", encoding="utf-8") as f:
        for dialogue, text in zip(chosen, texts):
            f.write(json.dumps({"context": list(dialogue.context), "knowledge": text}, ensure_ascii=False) + "\n")


def add_metrics_to_model_card(args: EvalArguments, model, result: dict) -> None:
    """Write the metrics row into a local checkpoint folder's model card; baseline and ablation runs leave it."""
    from vikdf.evaluation.model_card import update_model_card_metrics
    from vikdf.output_folder import MODEL_CARD_LOCK, folder_lock

    if not (args.update_model_card and os.path.isdir(args.model_name_or_path)):
        return
    if args.baseline is not None or args.knowledge_ablation != "none":
        logger.info("Baseline or ablation run: the checkpoint's model card is left unchanged.")
        return
    # Another evaluation of this checkpoint may be adding its row: one read-modify-write at a time.
    with folder_lock(args.model_name_or_path, "--model_name_or_path", MODEL_CARD_LOCK, wait=True):
        card = update_model_card_metrics(
            args.model_name_or_path, result["metrics"], _test_name(args), config=model.config, tokenizer=result["tokenizer"],
        )
    logger.info(f"Model card updated: {card}")


def main(argv: list[str] | None = None) -> dict | None:
    """Evaluate (or, with --aggregate, summarise runs); returns the metrics dict (or the summary) on rank 0 and
    None on the other processes of a multi-process run."""
    from vikdf.training.quantization import LLMQuantizationArguments

    args, quantization = HfArgumentParser((EvalArguments, LLMQuantizationArguments)).parse_args_into_dataclasses(args=argv)
    check_arguments(args)
    import torch
    from accelerate import PartialState

    from vikdf.checks import fit_generation_length
    from vikdf.evaluation.dialogues import (
        evaluate_dialogues,
        load_checkpoint,
        metrics_markdown,
        metrics_notes,
        write_evaluation,
    )
    from vikdf.evaluation.knowledge_ablation import knowledge_ablation
    from vikdf.output_folder import writer_lock
    from vikdf.training.arguments import resolve_dtype

    # Without a GPU, cpu=True lets accelerate join the launched processes over gloo (it finds no backend otherwise).
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if args.aggregate:
        return run_aggregate(args) if state.is_main_process else None
    dialogues = load_test_dialogues(args, quantization)

    # Every process checks that --output_dir is not a file; the one that writes the files holds the folder's lock.
    with writer_lock(args.output_dir, state.is_main_process):
        # Each process on its own device (cuda:LOCAL_RANK under accelerate launch; cpu without a GPU).
        device = torch.device(args.device) if args.device else state.device
        dtype = resolve_dtype(args.precision)
        model, processor = load_checkpoint(args.model_name_or_path, dtype, quantization.bitsandbytes_config(dtype))
        model.to(device).eval()
        generation = decoding_settings(args, model)
        fit_generation_length(model.config, processor, generation["max_new_tokens"])
        with_knowledge, system = evaluated_system(args, model.config)
        logger.info(
            f"Evaluating {system} from {args.model_name_or_path} on {len(dialogues)} dialogues of {args.test_file}."
        )
        with knowledge_ablation(model, args.knowledge_ablation, seed=args.seed):
            result = evaluate_dialogues(
                model, processor, dialogues, state=state, with_knowledge=with_knowledge, glove_path=args.glove_path,
                batch_size=args.batch_size, compute_perplexity=not args.skip_perplexity,
                seed=args.seed if generation["do_sample"] else None, progress=not args.disable_tqdm, **generation,
            )
        if not state.is_main_process:
            return None  # rank 0 alone writes the files and the model card
        info = {**asdict(args), "system": system, "with_knowledge": with_knowledge, "num_dialogues": len(dialogues),
                "num_processes": state.num_processes, "generation": generation}
        write_evaluation(args.output_dir, result, info)
        logger.info(f"{system} on {args.test_file}:\n{metrics_markdown(result['metrics'])}"
                    f"{metrics_notes(result['metrics'], result['tokenizer'])}")
        if args.textualise > 0:
            write_textualised_knowledge(args, model, processor, dialogues, generation)
        add_metrics_to_model_card(args, model, result)
        return result["metrics"]


if __name__ == "__main__":
    pylogging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=pylogging.INFO)
    main(sys.argv[1:])
