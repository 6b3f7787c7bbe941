"""Dialogue fine-tuning of VIKDF on text alone: P(R | C, K) with K distilled from the context (paper §3.4.1).

    accelerate launch train_dialogue.py --preset paper-reddit --model_name_or_path runs/pretrain \
        --train_file reddit/train.json --output_dir runs/vikdf-reddit
    accelerate launch train_dialogue.py --preset paper-image-chat --model_name_or_path runs/vikdf-reddit \
        --train_file image_chat/train.json --train_fraction 0.25 --output_dir runs/vikdf-image-chat-quarter

The paper's rows (Table 1), as the release's scripts/run_inference.sh produced them: Reddit = fine-tuning on
Reddit; Image-Chat with 1, 1/4 or 1/8 of its training set = fine-tuning on Image-Chat *starting from the Reddit
checkpoint*; "Zero Data" (‡) = the Reddit checkpoint tested on Image-Chat with no Image-Chat training at all.
`--train_fraction 0` trains nothing and only re-saves the checkpoint as an inference checkpoint; it is not a row of
the paper unless that checkpoint is the Reddit one.

`--preset paper-reddit` / `paper-image-chat` set the release's fine-tuning settings (`PRESETS`); flags given
explicitly still win.

`--method vikdf` trains the queries, the IQ-Former and `language_projection`; CLIP and the LLM stay frozen.
`--method lora` is the Table-4 baseline: LoRA adapters on the LLM, trained on the same chat template *without*
knowledge. Its adapters are merged into the LLM weights at the end, so the output is an ordinary VIKDF checkpoint
(config `dialogue_method="lora"`) that `eval_dialogue.py` evaluates without knowledge automatically; the
intermediate `checkpoint-*` folders hold the trainable tensors only (for LoRA the adapters; `--save_full_model`: the
whole model, or the peft adapters folder for LoRA). LoRA runs need ZeRO-2 or no DeepSpeed.

Every output folder is an inference checkpoint (pre-training heads dropped) with the processor, loadable with
`AutoModel.from_pretrained(dir, trust_remote_code=True)`, and a Hub model card (README.md,
`vikdf.evaluation.model_card`).
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from vikdf.data.dialogue import FORMATS, SUBSETS, Dialogue, load_dialogues, parse_turn_counts
from vikdf.defaults import DialogueSchedule
from vikdf.quick_help import exit_on_quick_help, full_help_argv
from vikdf.training.quantization import LLMQuantizationArguments

# torch, the model and the Trainer are imported inside the functions, so that `--help` answers in a second.
if TYPE_CHECKING:
    from modeling_vikdf import VIKDFForConditionalGeneration
    from processing_vikdf import VIKDFProcessor
    from vikdf.training.arguments import DialogueTrainingArguments
    from vikdf.training.trainers import VIKDFDialogueTrainer

logger = logging.get_logger("train_dialogue")

FRACTIONS = (1.0, 0.25, 0.125, 0.0)

# The release's fine-tuning (scripts/run_inference.sh and inference.py's defaults): AdamW lr 1e-4, weight decay 0,
# no warm-up, linear decay, per process 4 × 8 accumulation; LLM input cut at 128 tokens and responses at 32, which
# in our layout (one budget for prompt, 32 knowledge slots and response) is a total of 128 + 32 + 32 = 192. Reddit:
# 5 epochs, dialogues with 2-3 context turns only (the release's reader drops the others); Image-Chat: 1 epoch,
# from the Reddit checkpoint.
_PAPER_FINE_TUNING = (
    "--learning_rate", "1e-4", "--weight_decay", "0", "--warmup_steps", "0", "--lr_scheduler_type", "linear",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8", "--max_length", "192",
    "--max_response_length", "32", "--subset", "first",
)  # fmt: skip
PRESETS = {
    "paper-reddit": (*_PAPER_FINE_TUNING, "--num_train_epochs", "5", "--context_turns", "2,3"),
    "paper-image-chat": (*_PAPER_FINE_TUNING, "--num_train_epochs", "1"),
}


@dataclass
class DialogueModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "VIKDF checkpoint (folder or hub id), normally the output of train_pretrain.py."}
    )
    method: str = field(
        default="vikdf",
        metadata={
            "help": "vikdf: train queries, IQ-Former and language_projection with knowledge (paper §3.4.1). "
            "lora: the Table-4 baseline, LoRA on the frozen LLM without knowledge (merged at the end).",
        },
    )
    freeze_iq_former: bool = field(
        default=False,
        metadata={"help": "Beyond the paper's recipe (--method vikdf): train language_projection only, keeping the "
                          "queries and the IQ-Former, hence K, as pre-training left them."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (--method lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (--method lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path (--method lora)."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated LLM module names to adapt, e.g. q_proj,k_proj,v_proj,o_proj (--method lora); "
            "default: peft's choice for the LLM family (q_proj,v_proj for Llama, Qwen2, Mistral)."
        },
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "Licence name for the model card (default: the base LLM family's, e.g. llama2 for Llama-2, "
            "apache-2.0 for Qwen2.5 and Mistral)."
        },
    )
    base_model_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the LLM for the model card's base_model (default: the LLM name the config remembers)."
        },
    )


@dataclass
class DialogueDataArguments:
    preset: str | None = field(
        default=None,
        metadata={
            "help": "The release's fine-tuning settings: paper-reddit (5 epochs, lr 1e-4 linear, no warm-up, weight "
            "decay 0, batch 4 x 8 accumulation per process, 128 + 32 tokens, 2-3 context turns) or paper-image-chat "
            "(the same for 1 epoch, run from the Reddit checkpoint). Flags given explicitly win over the preset.",
            "choices": list(PRESETS),
        },
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Training dialogues: Reddit Conversation JSON/TSV or Image-Chat JSON (not needed with fraction 0)."},
    )
    train_format: str = field(
        default="auto", metadata={"help": "Format of --train_file.", "choices": ["auto", *FORMATS]}
    )
    train_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Share of the training set to use: the paper's Image-Chat rows 1, 1/4 (0.25) and 1/8 (0.125), "
            "each fine-tuned from the Reddit checkpoint. 0 trains nothing and re-saves the checkpoint; the paper's "
            "'Zero Data' row is the Reddit checkpoint tested on Image-Chat, so it needs no run of this script."
        },
    )
    subset_seed: int = field(
        default=0, metadata={"help": "Seed of the training subset, fixed so that runs with different --seed share it."}
    )
    max_context_turns: int | None = field(
        default=None,
        metadata={
            "help": "Truncate every context to its last N turns. The release truncates nothing: its Reddit reader "
            "drops dialogues whose context has other than 2-3 turns (that is --context_turns 2,3)."
        },
    )
    context_turns: str | None = field(
        default=None,
        metadata={
            "help": "Keep only dialogues whose context has one of these numbers of turns, e.g. 2,3 (the release's "
            "Reddit reader; --preset paper-reddit sets it); the others are dropped and counted in the log."
        },
    )
    skip_bad_records: bool = field(
        default=False, metadata={"help": "Skip malformed dialogue records (and log how many) instead of failing."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Optional validation dialogues for eval_loss (set --eval_strategy too)."}
    )
    validation_format: str = field(
        default="auto", metadata={"help": "Format of --validation_file.", "choices": ["auto", *FORMATS]}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Longest LLM sequence per example (default: the processor's, 512)."}
    )
    max_response_length: int | None = field(
        default=None,
        metadata={
            "help": "Cut responses to this many tokens and give the prompt always the rest of --max_length, the "
            "release's separate budgets (--preset paper-*: 32, with --max_length 192 = 128 + 32 slots + 32). Default: "
            "a response takes up to half of --max_length and the prompt what it leaves."
        },
    )
    subset: str = field(
        default="random",
        metadata={
            "help": "How --train_fraction picks its dialogues: random (a seeded nested subset, --subset_seed) or "
            "first (the file's first floor(fraction x N), as the release; --preset paper-* sets it).",
            "choices": list(SUBSETS),
        },
    )
    dataset_names: str | None = field(
        default=None, metadata={"help": "Comma-separated Hub dataset ids for the model card metadata."}
    )


@dataclass
class DialogueTrainingResult:
    """What `main` produced: the saved folder, the final model and processor, and the trainer (None at fraction 0)."""

    output_dir: str
    model: Any
    processor: VIKDFProcessor
    trainer: VIKDFDialogueTrainer | None
    num_train_dialogues: int
    train_metrics: dict[str, float] = field(default_factory=dict)


def check_arguments(model_args: DialogueModelArguments, data_args: DialogueDataArguments) -> None:
    from configuration_vikdf import DIALOGUE_METHODS  # the config's field owns the methods; it imports torch
    from vikdf.checks import check_positive

    # A budget of 0 would cut every response to nothing: training would score no token and still save a checkpoint.
    check_positive(data_args.max_response_length, "--max_response_length")
    if not 0.0 <= data_args.train_fraction <= 1.0:
        raise ValueError(f"--train_fraction must be in [0, 1] (paper: 1, 0.25, 0.125, 0), got {data_args.train_fraction}.")
    if data_args.train_fraction not in FRACTIONS:
        logger.warning(f"--train_fraction {data_args.train_fraction} is none of the paper's {FRACTIONS}.")
    if data_args.train_fraction > 0 and data_args.train_file is None:
        raise ValueError("--train_file is required unless --train_fraction 0 (no training).")
    if model_args.method not in DIALOGUE_METHODS:
        raise ValueError(f"--method {model_args.method!r}; choose one of {', '.join(DIALOGUE_METHODS)}.")
    if model_args.freeze_iq_former and model_args.method != "vikdf":
        raise ValueError("--freeze_iq_former keeps VIKDF's IQ-Former as it is: it goes with --method vikdf only.")
    check_positive(model_args.lora_r, "--lora_r")
    if model_args.method == "lora" and data_args.train_fraction == 0:
        raise ValueError(
            "--method lora with --train_fraction 0 trains no adapters, so the checkpoint would be the frozen LLM "
            "under a LoRA label; evaluate that with eval_dialogue.py --baseline llm instead."
        )


def with_preset(argv: list[str]) -> list[str]:
    """`argv` after the flags of its `--preset`, so that flags given explicitly (parsed last) win."""
    for index, word in enumerate(argv):
        if word == "--preset" and index + 1 < len(argv):
            name = argv[index + 1]
        elif word.startswith("--preset="):
            name = word.split("=", 1)[1]
        else:
            continue
        if name not in PRESETS:
            raise ValueError(f"--preset {name!r}; choose one of {sorted(PRESETS)}.")
        return [*PRESETS[name], *argv]
    return list(argv)


def add_lora(model: VIKDFForConditionalGeneration, model_args: DialogueModelArguments):
    """Wrap `model` in peft LoRA on the LLM's attention projections only; every other weight is frozen."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    family = model.config.text_config.model_type
    if model_args.lora_target_modules:
        targets = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    else:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(family, ["q_proj", "v_proj"])
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        # A regex is matched against full module names: only the LLM's layers, never the IQ-Former or CLIP.
        target_modules=rf"language_model\..*\.({'|'.join(map(str, targets))})",
    )
    model.set_trainable_stage("frozen")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info(f"LoRA on {family} modules {targets}: {trainable:,} trainable parameters.")
    return peft_model


def _load(path: str | None, fmt: str, data_args: DialogueDataArguments, fraction: float = 1.0) -> list[Dialogue]:
    if path is None:
        return []
    dialogues = load_dialogues(
        path, format=fmt, fraction=fraction, max_context_turns=data_args.max_context_turns,
        skip_bad=data_args.skip_bad_records, seed=data_args.subset_seed, subset=data_args.subset,
        context_turns=parse_turn_counts(data_args.context_turns) if data_args.context_turns else None,
    )
    if not dialogues and fraction > 0:
        raise ValueError(f"{path}: no dialogues to train on.")
    return dialogues


def set_lengths(processor: VIKDFProcessor, data_args: DialogueDataArguments) -> VIKDFProcessor:
    """The processor with the length flags that were given (the saved processor keeps them)."""
    if data_args.max_length is not None:
        processor.max_length = data_args.max_length
    if data_args.max_response_length is not None:
        processor.max_response_length = data_args.max_response_length
    return processor


def preflight(
    model_args: DialogueModelArguments, data_args: DialogueDataArguments, quantization: LLMQuantizationArguments
) -> tuple[list[Dialogue], list[Dialogue]]:
    """Everything checked before the model loads: the checkpoint's folder, config and weight files, the lengths,
    the quantisation, and the data, read and validated; returns the training and validation dialogues."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from processing_vikdf import VIKDFProcessor
    from vikdf.checks import check_input_file, check_max_length, check_max_length_fits_layout, load_checkpoint_config
    from vikdf.training.quantization import check_quantization_request, checkpoint_quantization

    config = load_checkpoint_config(model_args.model_name_or_path)
    check_quantization_request(quantization, config, model_args.model_name_or_path, is_deepspeed_zero3_enabled())
    if model_args.method == "lora" and (quantization.quantized or checkpoint_quantization(config) != "none"):
        # Merging adapters into 4-/8-bit weights rounds them again: the merged baseline would not be the one trained.
        raise ValueError("--method lora merges its adapters into the LLM at the end; train it on an unquantised LLM.")
    check_max_length(config, data_args.max_length)
    if data_args.max_length is not None or data_args.max_response_length is not None:
        processor = set_lengths(VIKDFProcessor.from_pretrained(model_args.model_name_or_path), data_args)
        check_max_length_fits_layout(processor, with_knowledge=model_args.method == "vikdf")
    if data_args.train_fraction > 0:
        check_input_file(data_args.train_file, "--train_file")
    check_input_file(data_args.validation_file, "--validation_file")
    train = _load(data_args.train_file, data_args.train_format, data_args, data_args.train_fraction)
    validation = _load(data_args.validation_file, data_args.validation_format, data_args)
    return train, validation


def save_inference_checkpoint(model, processor: VIKDFProcessor, output_dir: str) -> None:
    """Weights, config, remote code and processor in `output_dir` (main process only), written to a staging folder
    first and moved in with config.json last, so that a kill never leaves a loadable-looking half checkpoint."""
    from vikdf.atomic import commit_folder, staging_folder

    staged = staging_folder(output_dir, "model")
    model.save_pretrained(staged)
    processor.save_pretrained(staged)
    commit_folder(staged, output_dir)


PUSH_IGNORE_PATTERNS = ["checkpoint-*", "_*", "training_args.bin"]


def push_folder(output_dir: str, training_args: DialogueTrainingArguments, message: str) -> None:
    """Upload a folder the Trainer did not push itself (zero-resource and merged LoRA checkpoints)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(output_dir))
    repo = create_repo(repo_id, private=training_args.hub_private_repo, token=training_args.hub_token, exist_ok=True)
    upload_folder(
        repo_id=repo.repo_id, folder_path=output_dir, commit_message=message, token=training_args.hub_token,
        # training_args.bin is a pickle of this run's arguments (paths, tokens): nothing a model user needs.
        ignore_patterns=PUSH_IGNORE_PATTERNS,
    )


def parse_arguments(argv: list[str] | None):
    """The four flag groups, a `--preset`'s flags first so that flags given explicitly win."""
    from transformers import HfArgumentParser

    from vikdf.training.arguments import DialogueTrainingArguments

    parser = HfArgumentParser(
        (DialogueModelArguments, DialogueDataArguments, LLMQuantizationArguments, DialogueTrainingArguments)
    )
    argv = full_help_argv(with_preset(sys.argv[1:] if argv is None else argv))
    return parser.parse_args_into_dataclasses(args=argv)


def load_dialogue_model(
    model_args: DialogueModelArguments, data_args: DialogueDataArguments, quantization, training_args
) -> tuple[VIKDFForConditionalGeneration, VIKDFProcessor]:
    """The pre-trained checkpoint made a dialogue checkpoint: no pre-training heads, the paper's decoding, the
    length flags and the fine-tuning method in its config."""
    from modeling_vikdf import paper_generation_config
    from vikdf.evaluation.dialogues import load_checkpoint
    from vikdf.training.arguments import resolve_dtype

    dtype = resolve_dtype(training_args.precision)
    model, processor = load_checkpoint(model_args.model_name_or_path, dtype, quantization.bitsandbytes_config(dtype))
    model.drop_pretraining_heads()  # dialogue never uses them; every folder written is an inference checkpoint
    # Every dialogue checkpoint decodes as the paper does, also one fine-tuned from an older checkpoint whose
    # generation config is the LLM's own (Llama-2-chat's samples).
    model.generation_config = paper_generation_config(model.generation_config)
    set_lengths(processor, data_args)
    model.config.dialogue_method = model_args.method  # every entry point runs a LoRA checkpoint without knowledge
    return model, processor


def model_card_writer(model, model_args: DialogueModelArguments, data_args: DialogueDataArguments, training_args,
                      trained: bool):
    """`write_card(directory)`: the model card of this run's checkpoint."""
    from vikdf.evaluation.model_card import base_model_from_config, component_names_from_config, write_model_card

    def write_card(directory: str) -> None:
        write_model_card(
            directory,
            base_model=model_args.base_model_name or base_model_from_config(model.config),
            **component_names_from_config(model.config),
            license=model_args.license,
            method=model_args.method,
            train_file=data_args.train_file,
            train_fraction=data_args.train_fraction if trained else 0.0,
            datasets=[d.strip() for d in data_args.dataset_names.split(",")] if data_args.dataset_names else None,
            model_id=training_args.hub_model_id,
        )

    return write_card


def save_zero_resource_checkpoint(model, processor, training_args, write_card) -> None:
    """--train_fraction 0: the pre-trained checkpoint saved as the dialogue checkpoint, no fine-tuning (Table 1's
    zero-resource rows)."""
    logger.info("--train_fraction 0: no dialogue fine-tuning; saving the inference checkpoint only.")
    if training_args.should_save:
        save_inference_checkpoint(model, processor, training_args.output_dir)
        write_card(training_args.output_dir)
        if training_args.push_to_hub:
            push_folder(training_args.output_dir, training_args, "Zero-resource VIKDF checkpoint")


def model_to_train(model, model_args: DialogueModelArguments):
    """VIKDF with its dialogue stage's parts trainable (§3.4.1), or the LLM wrapped in LoRA (Table 4)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if model_args.method == "vikdf":
        model.set_trainable_stage("dialogue_projection" if model_args.freeze_iq_former else "dialogue")
        return model
    if is_deepspeed_zero3_enabled():
        raise ValueError("--method lora merges the adapters into full LLM weights at the end; use ZeRO-2, not ZeRO-3.")
    return add_lora(model, model_args)


def save_trained_checkpoint(trainer, processor, model_args: DialogueModelArguments, training_args, write_card):
    """The fine-tuned checkpoint and its card; LoRA adapters merged into the LLM first, so that the folder is an
    ordinary VIKDF checkpoint. Returns the final model."""
    output_dir = training_args.output_dir
    if model_args.method == "vikdf":
        trainer.save_model()  # also pushes (with our card) when --push_to_hub
        final = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.is_world_process_zero():
            write_card(output_dir)
        return final
    final = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    if trainer.is_world_process_zero():
        save_inference_checkpoint(final, processor, output_dir)
        write_card(output_dir)
        if training_args.push_to_hub:
            push_folder(output_dir, training_args, "LoRA baseline (merged)")
    return final


def main(argv: list[str] | None = None) -> DialogueTrainingResult:
    exit_on_quick_help(argv, "train_dialogue.py", __doc__.split("\n\n")[0],
                       (DialogueModelArguments, DialogueDataArguments, LLMQuantizationArguments, DialogueSchedule))
    from transformers import set_seed

    from vikdf.data.collators import DialogueCollator
    from vikdf.output_folder import check_fresh_start, check_not_input_folder, writer_lock
    from vikdf.training.frozen_parts import sources_from_checkpoint
    from vikdf.training.trainers import VIKDFDialogueTrainer, resolve_resume_checkpoint

    model_args, data_args, quantization, training_args = parse_arguments(argv)
    logging.set_verbosity(training_args.get_process_log_level())
    check_arguments(model_args, data_args)
    set_seed(training_args.seed)
    train, validation = preflight(model_args, data_args, quantization)
    output_dir = training_args.output_dir
    check_not_input_folder(output_dir, model_args.model_name_or_path, "--model_name_or_path")
    with writer_lock(output_dir, training_args.should_save):
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir)
        check_fresh_start(output_dir, resume)
        model, processor = load_dialogue_model(model_args, data_args, quantization, training_args)
        write_card = model_card_writer(model, model_args, data_args, training_args, trained=bool(train))
        if not train:
            save_zero_resource_checkpoint(model, processor, training_args, write_card)
            return DialogueTrainingResult(output_dir, model, processor, None, 0)

        logger.info(f"Fine-tuning ({model_args.method}) on {len(train)} dialogues from {data_args.train_file}.")
        trainer = VIKDFDialogueTrainer(
            model=model_to_train(model, model_args),
            args=training_args,
            train_dataset=train,
            eval_dataset=validation or None,
            data_collator=DialogueCollator(processor, with_knowledge=model.config.dialogue_with_knowledge),
            processing_class=processor,
            model_card_writer=write_card,
            frozen_sources=sources_from_checkpoint(model, model_args.model_name_or_path),
        )
        result = trainer.train(resume_from_checkpoint=resume)
        if trainer.finished_before_start:
            return DialogueTrainingResult(output_dir, model, processor, trainer, len(train))
        final = save_trained_checkpoint(trainer, processor, model_args, training_args, write_card)
        if trainer.is_world_process_zero():
            trainer.save_metrics("train", result.metrics)
            trainer.save_state()
        return DialogueTrainingResult(output_dir, final, processor, trainer, len(train), dict(result.metrics))


if __name__ == "__main__":
    pylogging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=pylogging.INFO)
    main(sys.argv[1:])
