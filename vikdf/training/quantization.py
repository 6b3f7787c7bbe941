"""The frozen LLM held in 8-bit or 4-bit (bitsandbytes), the flags that ask for it, and the combinations refused.

VIKDF's LLM never trains (paper §3.4.1: both stages update the IQ-Former side only), so it is the part to quantise:
at paper size it is 13.5 GB of the model's 14.6 GB in bf16. Only the LLM's decoder layers are quantised; the
IQ-Former, the heads, `language_projection`, the CLIP towers and the LLM's output head stay as they are
(`modeling_vikdf.NOT_QUANTISED`; `benchmarks/bench_quantized_llm.py` has the arithmetic of what each would save).
Gradients still reach the knowledge `K` through the quantised layers, as they reach LoRA adapters in QLoRA.
"""

from dataclasses import dataclass, field

QUANTIZATIONS = ("none", "8bit", "4bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class LLMQuantizationArguments:
    llm_quantization: str = field(
        default="none",
        metadata={
            "help": "Hold the frozen LLM in 8-bit (LLM.int8) or 4-bit (bitsandbytes); everything that trains stays in "
            "full precision. A checkpoint records it, and loading it again quantises the same way.",
            "choices": list(QUANTIZATIONS),
        },
    )
    llm_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type (with --llm_quantization 4bit).", "choices": list(QUANT_TYPES)}
    )
    llm_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the quantised layers compute in (with --llm_quantization 4bit); auto: the run's "
            "--precision (bf16 on a GPU that has it, else fp32).",
            "choices": list(COMPUTE_DTYPES),
        },
    )

    def __post_init__(self):
        # Refused at parsing, before anything loads (argparse checks the choices).
        if self.llm_quantization != "4bit":
            for flag, value, default in (("--llm_quant_type", self.llm_quant_type, "nf4"),
                                         ("--llm_compute_dtype", self.llm_compute_dtype, "auto")):
                if value != default:
                    raise ValueError(f"{flag} {value} goes with --llm_quantization 4bit (this run: {self.llm_quantization}).")

    @property
    def quantized(self) -> bool:
        return self.llm_quantization != "none"

    def bitsandbytes_config(self, run_dtype):
        """The `BitsAndBytesConfig` of these flags (None for "none"); `modeling_vikdf` limits it to the LLM."""
        if not self.quantized:
            return None
        check_bitsandbytes("--llm_quantization " + self.llm_quantization)
        import torch
        from transformers import BitsAndBytesConfig

        if self.llm_quantization == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = run_dtype if self.llm_compute_dtype == "auto" else getattr(torch, _DTYPE_NAMES[self.llm_compute_dtype])
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.llm_quant_type, bnb_4bit_compute_dtype=compute
        )


def check_bitsandbytes(what: str) -> None:
    """bitsandbytes is an optional dependency: say how to get it before anything loads."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"{what} needs bitsandbytes: pip install -e '.[quantization]' (or pip install bitsandbytes)."
        ) from error


def checkpoint_quantization(config) -> str:
    """How a checkpoint's config says its LLM is held: "none", "8bit" or "4bit"."""
    recorded = getattr(config, "quantization_config", None)
    if recorded is None:
        return "none"
    recorded = recorded if isinstance(recorded, dict) else recorded.to_dict()
    return "4bit" if recorded.get("load_in_4bit") else "8bit" if recorded.get("load_in_8bit") else "none"


def check_quantization_request(args: LLMQuantizationArguments, config, source: str, deepspeed_zero3: bool = False) -> None:
    """The refused combinations, before any model loads.

    - A checkpoint already quantised keeps its own quantisation: asking for another would silently be ignored.
    - DeepSpeed ZeRO-3 partitions every parameter across ranks; bitsandbytes' packed weights cannot be partitioned
      and gathered like ordinary tensors.
    """
    held = "none" if config is None else checkpoint_quantization(config)
    if args.quantized:
        check_bitsandbytes(f"--llm_quantization {args.llm_quantization}")
    if held != "none":
        check_bitsandbytes(f"{source} (its LLM is held in {held})")
        if args.quantized and args.llm_quantization != held:
            raise ValueError(
                f"{source} holds its LLM in {held}; --llm_quantization {args.llm_quantization} cannot change that. "
                f"Leave the flag out (the checkpoint's {held} applies), or start from an unquantised checkpoint."
            )
    if (args.quantized or held != "none") and deepspeed_zero3:
        raise ValueError(
            "DeepSpeed ZeRO-3 cannot partition a bitsandbytes-quantised LLM; use ZeRO-2 "
            "(ds_configs/accelerate_zero2.yaml), plain DDP, or --llm_quantization none."
        )


__all__ = ["LLMQuantizationArguments", "QUANTIZATIONS", "check_bitsandbytes", "check_quantization_request", "checkpoint_quantization"]
