"""`--help` of an entry point in about a second: its own flags and the paper's training defaults, built from
dataclasses that import nothing heavy.

The full parser needs `transformers.TrainingArguments`, whose import pulls in torch, peft and accelerate: 8–10 s on
a 2-core CPU (benchmarks/bench_startup.py), for a help text. `--help_all` still prints that parser's help, with every
Trainer flag.
"""

import sys
from collections.abc import Sequence

HELP_FLAGS = ("-h", "--help")
FULL_HELP_FLAG = "--help_all"


def exit_on_quick_help(argv: Sequence[str] | None, prog: str, description: str, dataclass_types: Sequence[type]) -> None:
    """Print the quick help of `dataclass_types` and exit when `argv` asks for `--help` (not `--help_all`)."""
    argv = sys.argv[1:] if argv is None else argv
    if FULL_HELP_FLAG in argv or not any(arg in HELP_FLAGS for arg in argv):
        return
    from transformers.hf_argparser import HfArgumentParser  # transformers' parser module alone: no torch

    epilog = (
        "Every flag of transformers.TrainingArguments is accepted too (--output_dir, --gradient_accumulation_steps, "
        f"--deepspeed, --push_to_hub, ...): {FULL_HELP_FLAG} lists them all (it imports torch, several seconds)."
    )
    HfArgumentParser(list(dataclass_types), prog=prog, description=description, epilog=epilog).print_help()
    sys.exit(0)


def full_help_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with `--help_all` read as the full parser's `--help`."""
    return ["--help" if arg == FULL_HELP_FLAG else arg for arg in argv]
