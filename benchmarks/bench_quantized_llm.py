"""The frozen LLM in bf16/fp32, 8-bit and 4-bit: the paper-size model's memory by arithmetic, and a medium model's
weights, peak RSS and dialogue fine-tuning step time, each precision in a fresh process (benchmarks/README.md)."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import _bench_common as common  # puts the repository root on sys.path, sets the offline environment
import psutil
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import vikdf.training.components  # noqa: F401  (the libraries, imported before a child's RSS baseline)
from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration
from vikdf.testing import TinyComponentPaths
from vikdf.training.quantization import LLMQuantizationArguments

MODES = ("none", "8bit", "4bit")
MEDIUM_LLM = {"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 16, "head_dim": 64}
BLOCK = 64  # bitsandbytes' default 4-bit block size
GiB = 2**30


def quantised_linears(language_model: nn.Module) -> dict[str, nn.Linear]:
    """The LLM's linear layers bitsandbytes quantises (all but the output head; its layers subclass `nn.Linear`)."""
    head = language_model.get_output_embeddings()
    return {name: m for name, m in language_model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def storage_bytes(linears, mode: str, full_bytes_per_weight: int) -> int:
    """Bytes of these linear layers' weights (Llama has no biases): LLM.int8 keeps 1 byte per weight and an fp32
    scale per output row; 4-bit (nf4/fp4) half a byte per weight and an fp32 absmax per block of 64 weights."""
    sizes = [m.in_features * m.out_features for m in linears]
    if mode == "8bit":
        return sum(sizes) + 4 * sum(m.out_features for m in linears)
    if mode == "4bit":
        return sum(sizes) // 2 + 4 * sum(-(-size // BLOCK) for size in sizes)
    return sum(sizes) * full_bytes_per_weight


def paper_size_rows() -> tuple[list[list], dict]:
    """The paper-size model's bytes per LLM precision: its LLM layers by the storage rule, the rest bf16 (fp32 kept)."""
    with torch.device("meta"):
        model = VIKDFForConditionalGeneration(VIKDFConfig())
    linears = quantised_linears(model.language_model).values()
    clip = [m for m in [*model.text_encoder.modules(), *model.vision_encoder.modules()] if isinstance(m, nn.Linear)]
    unquantised = common.bf16_weight_bytes(model) - storage_bytes(linears, "none", 2)
    rows, payload = [], {"parameters": model.num_parameters(),
                         "quantised_llm_weights": sum(m.weight.numel() for m in linears),
                         "clip_linear_bytes": {mode: storage_bytes(clip, mode, 2) for mode in MODES}}
    for mode in MODES:
        llm_layers = storage_bytes(linears, mode, 2)
        payload[mode] = {"llm_layers_bytes": llm_layers, "model_bytes": llm_layers + unquantised}
        rows.append([f"paper size, LLM {'bf16' if mode == 'none' else mode} (arithmetic)", common.fmt(llm_layers / GiB),
                     common.fmt(payload[mode]["model_bytes"] / GiB), "", ""])
    return rows, payload


def write_medium_llm(llm_folder: Path) -> None:
    """A medium random Llama in place of the tiny one (their tokenizer stays)."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llm_folder, **MEDIUM_LLM)).save_pretrained(llm_folder)


def measure_one(root: Path, mode: str, steps: int) -> dict:
    """One precision, in this fresh process: build from the components in `root`, then `steps` timed dialogue
    fine-tuning steps after a warm-up."""
    quantization = LLMQuantizationArguments(llm_quantization=mode).bitsandbytes_config(torch.float32)
    libraries = psutil.Process().memory_info().rss  # torch, transformers and bitsandbytes imported, no weight yet
    torch.manual_seed(0)
    components = TinyComponentPaths(root / "clip", root / "bert", root / "llm-llama")
    model, processor = common.tiny_vikdf(components, quantization_config=quantization, include_pretraining_heads=False)
    model.set_trainable_stage("dialogue")
    linears = quantised_linears(model.language_model)
    llm_layers = sum(t.numel() * t.element_size() for m in linears.values() for t in m.state_dict().values())
    batch = processor.dialogue_batch([["a dog in the park", "is it playing with a red ball?"]] * 4,
                                     ["yes, and it looks very happy today."] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = [common.timed(step)[1] for _ in range(steps + 1)]  # the first is a warm-up
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"mode": mode, "peak_rss_bytes": peak_rss, "added_rss_bytes": peak_rss - libraries,
            "footprint_bytes": model.get_memory_footprint(), "llm_layers_bytes": llm_layers,
            "rule_llm_layers_bytes": storage_bytes(linears.values(), mode, 4), "step_s": statistics.median(times[1:])}


def main() -> None:
    parser = common.argument_parser(__doc__, sizes=None)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per precision (after one warm-up).")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a child process: a precision, the components
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(Path(args.one[1]), args.one[0], args.steps)))
        return

    rows, paper = paper_size_rows()
    with common.tiny_workspace() as (work, components, _):
        write_medium_llm(components.llm)
        child = [sys.executable, __file__, "--steps", str(args.steps), "--one"]  # each precision in a fresh interpreter
        measured = [json.loads(subprocess.run([*child, mode, str(work / "components")], check=True, capture_output=True,
                                              text=True).stdout.splitlines()[-1]) for mode in MODES]
    rows += [[f"medium, LLM {'fp32' if m['mode'] == 'none' else m['mode']} (measured)",
              *(common.fmt(m[key] / GiB, 3) for key in ("llm_layers_bytes", "footprint_bytes", "added_rss_bytes")),
              common.fmt(m["step_s"], 3)] for m in measured]
    ratio = {m["mode"]: measured[0]["step_s"] / m["step_s"] for m in measured}
    clip = {mode: paper["clip_linear_bytes"][mode] / GiB for mode in MODES}
    common.publish("quantized_llm_cpu", "The frozen LLM quantised: memory and step time", [
        common.markdown_table(["setting", "LLM layers GiB", "model GiB", "peak RSS added GiB", "step s"], rows), "",
        f"- step: median of {args.steps} after a warm-up; speed relative to fp32: "
        + ", ".join(f"{mode} {ratio[mode]:.2f}×" for mode in MODES[1:]),
        "- storage rule against the medium model's quantised layers (measured / rule): "
        + ", ".join(f"{m['mode']} {m['llm_layers_bytes'] / m['rule_llm_layers_bytes']:.3f}" for m in measured),
        f"- paper-size CLIP linear layers, kept unquantised: {clip['none']:.2f} GiB in bf16, {clip['4bit']:.2f} GiB "
        "if 4-bit"], {"paper_size": paper, "medium": measured, "speed_vs_fp32": ratio}, args.output_dir)


if __name__ == "__main__":
    main()
