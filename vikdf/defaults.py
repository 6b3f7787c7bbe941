"""The paper's defaults that the entry points' flags carry, in a module that imports neither torch nor transformers'
training stack, so that `--help` can show them in about a second (`vikdf.quick_help`).

`vikdf.training.arguments` puts the schedules over `transformers.TrainingArguments`; `vikdf.training.components` builds
from the component ids.
"""

from dataclasses import dataclass, field

# Paper §4.1: CLIP ViT-L/14, the IQ-Former initialised from BERT-base, Llama-2-7B-chat.
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_BERT = "bert-base-uncased"
DEFAULT_LLM = "meta-llama/Llama-2-7b-chat-hf"

PRECISIONS = ("auto", "bf16", "fp32")
# eval_dialogue.py --knowledge_ablation: K as distilled, zeros, or shuffled across the batch
# (vikdf.evaluation.knowledge_ablation).
KNOWLEDGE_ABLATIONS = ("none", "zero", "shuffle")


@dataclass
class TrainingFlags:
    """What the project adds to `TrainingArguments` (`vikdf.training.arguments`), here without torch so the quick help lists it."""

    precision: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on a GPU that supports it, fp32 on CPU), bf16 or fp32. Sets --bf16 for you."},
    )
    save_full_model: bool = field(
        default=False,
        metadata={
            "help": "Write every checkpoint-N as the whole model, loadable with AutoModel (as the final save always "
            "is). By default a checkpoint holds the trainable parameters, the optimizer, scheduler and RNG states and "
            "frozen_parts.json (each frozen part's source and fingerprint): resuming rebuilds the frozen parts from "
            "their sources and refuses one that differs."
        },
    )


@dataclass
class PretrainSchedule(TrainingFlags):
    """Paper §4.2: 4 GPUs × 32 = global batch 128, 100k steps, AdamW lr 1e-4, weight decay 0.05, a linear warm-up
    over a tenth of the steps (then constant, as released)."""

    per_device_train_batch_size: int = field(default=32, metadata={"help": "Micro-batch per device (paper: 4 × 32)."})
    max_steps: int = field(default=100_000, metadata={"help": "Training steps (paper: 100k)."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (paper: 1e-4)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (paper: 0.05)."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Linear warm-up: steps, or a ratio < 1 (paper: 0.1)."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup",
        metadata={
            "help": "Schedule: linear warm-up (a tenth of the steps, as in the paper), then constant, as the release's "
            "scripts/run_train.sh asked for (`linear` decays to 0 instead). The release's DeepSpeed config "
            "(ds_config_zero1.json) replaced even that with DeepSpeed's WarmupLR: a logarithmic warm-up over the same "
            "steps, then constant. Our ds_configs/ have no scheduler block, so this flag holds under DeepSpeed too."
        },
    )
    save_steps: float = field(default=5000, metadata={"help": "Checkpoint every N steps."})
    logging_steps: float = field(default=50, metadata={"help": "Log the five objectives every N steps."})


@dataclass
class DialogueSchedule(TrainingFlags):
    """Dialogue fine-tuning defaults (the paper gives none beyond pre-training's optimiser)."""

    per_device_train_batch_size: int = field(default=16, metadata={"help": "Micro-batch per device."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the (fraction of the) dialogue set."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Linear warm-up: steps, or a ratio < 1."})
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint."})
