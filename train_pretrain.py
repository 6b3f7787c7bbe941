"""Pre-training of VIKDF: knowledge distillation (eq. 5) and integration (eq. 9) together on image–text pairs.

    accelerate launch --config_file ds_configs/accelerate_zero2.yaml train_pretrain.py \
        --train_sources "coco=coco:/data/coco/annotations/captions_train2017.json:/data/coco/train2017;cc_sbu=wds:/data/cc3m/{00000..00331}.tar::/data/sbu/{00000..00099}.tar" \
        --source_probabilities 0.2,0.8 --output_dir runs/pretrain

Starts from pretrained parts (CLIP ViT-L/14, BERT-base, Llama-2-7B-chat by default) or from a VIKDF checkpoint; the
final output folder loads with `AutoModel.from_pretrained(dir, trust_remote_code=True)`. Each `checkpoint-N` holds the
trainable parameters and what resuming needs (`vikdf.training.trainable_checkpoints`; `--save_full_model`: the whole
model).
"""

import sys
from dataclasses import dataclass, field

from transformers.utils import logging

from vikdf.defaults import DEFAULT_BERT, DEFAULT_CLIP, DEFAULT_LLM, PretrainSchedule
from vikdf.training.quantization import LLMQuantizationArguments
from vikdf.quick_help import exit_on_quick_help, full_help_argv

# torch, the model and the Trainer are imported inside the functions, so that `--help` answers in a second.

# Inside the transformers namespace, so that --log_level (set_verbosity) governs and prints these lines too.
logger = logging.get_logger("transformers.train_pretrain")


@dataclass
class PretrainModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A VIKDF checkpoint to continue from; if unset, build from the parts below."}
    )
    clip_model: str = field(default=DEFAULT_CLIP, metadata={"help": "CLIP hub id or folder (frozen text/image towers)."})
    bert_model: str = field(default=DEFAULT_BERT, metadata={"help": "BERT hub id or folder initialising the IQ-Former."})
    llm_model: str = field(default=DEFAULT_LLM, metadata={"help": "Causal LLM hub id or folder (frozen)."})
    num_query_tokens: int | None = field(
        default=None,
        metadata={
            "help": "n, the number of queries / knowledge vectors (default 32). A checkpoint keeps its own n; "
            "a different value is refused."
        },
    )
    use_tim: bool = field(default=True, metadata={"help": "Train with Text-Image Matching (Table 3: −TIM)."})
    use_tamim: bool = field(default=True, metadata={"help": "Train with Text-Assisted Masked Image Modeling (−TAMIM)."})
    use_iamtm: bool = field(default=True, metadata={"help": "Train with Image-Assisted Masked Text Modeling (−IAMTM)."})
    use_bvif: bool = field(
        default=True, metadata={"help": "Instruction prompts + IAKR; off = plain BLIP-2 generative loss (−BVIF)."}
    )
    tim_pooling: str = field(default="first", metadata={"help": "TIM pooling: 'first' (as released) or 'max' (BLIP-2)."})
    config_overrides: str = field(
        default="{}", metadata={"help": 'JSON of further VIKDFConfig fields, e.g. \'{"loss_weight_tim": 0.5}\'.'}
    )


@dataclass
class PretrainDataArguments:
    train_sources: str = field(
        metadata={
            "help": "Pair sources separated by ';': [NAME=]wds:PATTERN[::PATTERN], [NAME=]coco:ANNOTATIONS:IMAGES, "
            "[NAME=]hf:PATH[:DATA_DIR]:IMAGE_COLUMN:TEXT_COLUMN[@SPLIT]."
        }
    )
    source_probabilities: str | None = field(
        default=None, metadata={"help": "Mixing probabilities, one per source, e.g. 0.2,0.8 (default: uniform)."}
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "Examples held in the streaming shuffle buffer."})


def requested_config_fields(model_args: PretrainModelArguments) -> dict:
    """The VIKDFConfig fields the flags set: the ablation switches, the TIM pooling and --config_overrides."""
    from vikdf.checks import parse_config_overrides

    return {
        "use_tim": model_args.use_tim,
        "use_tamim": model_args.use_tamim,
        "use_iamtm": model_args.use_iamtm,
        "use_bvif": model_args.use_bvif,
        "tim_pooling": model_args.tim_pooling,
        **parse_config_overrides(model_args.config_overrides),
    }


def check_model_arguments(model_args: PretrainModelArguments, quantization, deepspeed_zero3: bool = False):
    """The model and quantisation flags, checked before anything loads; the checkpoint's config (None when building
    from parts).

    The config the run will build is validated from config files alone, so a bad field costs no tower load.
    """
    from vikdf.checks import (
        check_config_fields,
        check_continued_query_count,
        check_model_source,
        check_num_query_tokens,
        check_parts_config,
        check_tim_pooling,
        load_checkpoint_config,
    )

    from vikdf.training.quantization import check_quantization_request

    check_num_query_tokens(model_args.num_query_tokens)
    check_tim_pooling(model_args.tim_pooling)
    fields = requested_config_fields(model_args)
    if model_args.model_name_or_path is None:
        for flag, source in (("--clip_model", model_args.clip_model), ("--bert_model", model_args.bert_model),
                             ("--llm_model", model_args.llm_model)):
            check_model_source(source, flag)
        check_parts_config(model_args.clip_model, model_args.bert_model, model_args.llm_model, fields)
        check_quantization_request(quantization, None, model_args.llm_model, deepspeed_zero3)
        return None
    config = load_checkpoint_config(model_args.model_name_or_path)
    check_quantization_request(quantization, config, model_args.model_name_or_path, deepspeed_zero3)
    check_continued_query_count(config, model_args.num_query_tokens, model_args.model_name_or_path)
    if not config.include_pretraining_heads:
        raise ValueError(
            f"{model_args.model_name_or_path} is an inference checkpoint without pre-training heads; "
            "pre-train from component models or from a pre-training checkpoint."
        )
    check_config_fields(config, fields)
    return config


def build_model(model_args: PretrainModelArguments, dtype, quantization_config=None):
    from configuration_vikdf import VIKDFConfig
    from modeling_vikdf import VIKDFForConditionalGeneration
    from processing_vikdf import VIKDFProcessor
    from vikdf.training.components import build_vikdf_from_components

    overrides = requested_config_fields(model_args)
    if model_args.model_name_or_path is None:
        return build_vikdf_from_components(
            model_args.clip_model, model_args.bert_model, model_args.llm_model,
            num_query_tokens=model_args.num_query_tokens or VIKDFConfig.num_query_tokens, dtype=dtype,
            quantization_config=quantization_config, **overrides,
        )
    model = VIKDFForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, quantization_config=quantization_config, **overrides
    )
    model.config.validate_fields()  # from_pretrained sets the overrides on the config without validating them
    return model, VIKDFProcessor.from_pretrained(model_args.model_name_or_path)


def main(argv: list[str] | None = None, callbacks: list | None = None):
    """Pre-train; returns the `VIKDFPretrainTrainer` after its final save (none when it resumed a
    finished run: nothing is written then). `callbacks` are `TrainerCallback`s for the trainer (the demo stops its
    pre-training on a criterion with one)."""
    exit_on_quick_help(argv, "train_pretrain.py", __doc__.split("\n\n")[0],
                       (PretrainModelArguments, PretrainDataArguments, LLMQuantizationArguments, PretrainSchedule))
    from transformers import HfArgumentParser, set_seed
    from transformers.integrations import is_deepspeed_zero3_enabled

    from vikdf.training.arguments import PretrainTrainingArguments, resolve_dtype
    from vikdf.data.collators import PretrainCollator
    from vikdf.data.pairs import build_pair_dataset
    from vikdf.training.frozen_parts import sources_from_checkpoint, sources_from_parts
    from vikdf.output_folder import check_fresh_start, check_not_input_folder, writer_lock
    from vikdf.data.stream_state import check_stream_resume
    from vikdf.training.trainers import VIKDFPretrainTrainer, enabled_objectives, resolve_resume_checkpoint

    parser = HfArgumentParser(
        (PretrainModelArguments, PretrainDataArguments, LLMQuantizationArguments, PretrainTrainingArguments)
    )
    argv = full_help_argv(sys.argv[1:] if argv is None else argv)
    model_args, data_args, quantization, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.set_verbosity(training_args.get_process_log_level())

    # The IQ-Former's cross-attention, the queries and the heads start random: --seed fixes them, as it fixes the data.
    set_seed(training_args.seed)
    # Flags, checkpoint and data sources (shard patterns expanded, files opened) first: a typo costs no model load.
    check_model_arguments(model_args, quantization, is_deepspeed_zero3_enabled())
    check_not_input_folder(training_args.output_dir, model_args.model_name_or_path, "--model_name_or_path")
    dataset = build_pair_dataset(
        data_args.train_sources, data_args.source_probabilities, seed=training_args.seed,
        shuffle_buffer=data_args.shuffle_buffer,
    )
    with writer_lock(training_args.output_dir, training_args.should_save):
        resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
        check_fresh_start(training_args.output_dir, resume)
        check_stream_resume(resume, training_args)
        dtype = resolve_dtype(training_args.precision)
        model, processor = build_model(model_args, dtype, quantization.bitsandbytes_config(dtype))
        model.set_trainable_stage("pretrain")
        logger.info(f"Objectives: {', '.join(enabled_objectives(model.config))}")
        trainer = VIKDFPretrainTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            # One seed per rank, so that ranks do not draw the same crops and masks for their n-th batches.
            data_collator=PretrainCollator(
                processor, model.config, seed=training_args.seed + training_args.process_index
            ),
            processing_class=processor,
            callbacks=callbacks,
            # What checkpoints record of the frozen parts, so that a resume can check it rebuilt the same ones.
            frozen_sources=(
                sources_from_parts(model_args.clip_model, model_args.bert_model, model_args.llm_model)
                if model_args.model_name_or_path is None
                else sources_from_checkpoint(model, model_args.model_name_or_path)
            ),
        )
        trainer.train(resume_from_checkpoint=resume)
        if not trainer.finished_before_start:
            trainer.save_model()
    logger.info(f"Skipped pairs: {dataset.skips.summary()}")
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
