"""The frozen LLM in bf16/fp32, 8-bit and 4-bit: memory of the paper-size model by arithmetic, and peak memory and
step time of a medium model measured on this machine, side by side in one run.

    python benchmarks/bench_quantized_llm.py            # → results/quantized_llm_<device>.{md,json}

Paper size (arithmetic, no weights): the parameter count of each part from the model built on the meta device, and
bitsandbytes' storage rule for the quantised LLM layers (`vikdf.training.quantization`; only the decoder layers' linear
weights are quantised): LLM.int8 keeps 1 byte per weight plus one fp32 scale per output row; 4-bit (nf4/fp4) keeps
half a byte per weight plus one fp32 absmax per block of 64 weights. The rule is checked against the measured size
of the medium model's quantised layers in the same run.

Medium size (measured): a Llama of 8 layers, width 1024 (101M parameters in its decoder layers, the part that is
quantised), with the tiny CLIP and BERT of the tests. Each precision runs in a process of its own (a clean peak):
build from component folders, then dialogue fine-tuning steps (forward, backward through the LLM to `K`, AdamW on
the trained parts) on one fixed batch.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import (
    count_parameters, device_slug, fmt, machine_info, machine_lines, markdown_table, rss_bytes, write_results,
)

import torch  # noqa: E402  (after _bench_common, which sets the offline environment)
from torch import nn  # noqa: E402

MODES = ("none", "8bit", "4bit")
MEDIUM_LLM = {"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 16, "head_dim": 64}
BLOCK = 64  # bitsandbytes' default 4-bit block size
GiB = 2**30


def quantised_linears(language_model: nn.Module) -> dict[str, nn.Linear]:
    """The LLM's linear layers a bitsandbytes config quantises (all but the output head, `modeling_vikdf`), by name;
    bitsandbytes' layers are `nn.Linear` subclasses."""
    head = language_model.get_output_embeddings()
    return {name: m for name, m in language_model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def storage_bytes(linears, mode: str, full_bytes_per_weight: int) -> int:
    """Bytes of these linear layers' weights under bitsandbytes' storage rule (no biases: Llama has none)."""
    sizes = [m.in_features * m.out_features for m in linears]
    if mode == "8bit":
        return sum(sizes) + 4 * sum(m.out_features for m in linears)
    if mode == "4bit":
        return sum(sizes) // 2 + 4 * sum(-(-size // BLOCK) for size in sizes)
    return sum(sizes) * full_bytes_per_weight


def paper_size_rows() -> tuple[list[list], dict]:
    from configuration_vikdf import VIKDFConfig
    from modeling_vikdf import VIKDFForConditionalGeneration

    with torch.device("meta"):
        model = VIKDFForConditionalGeneration(VIKDFConfig())
    linears = quantised_linears(model.language_model).values()
    quantisable = sum(m.weight.numel() for m in linears)
    total = count_parameters(model)
    fp32_kept = count_parameters(model.iq_former) + model.query_tokens.numel()  # `_keep_in_fp32_modules`
    rest = total - quantisable - fp32_kept  # CLIP, heads, LLM embeddings/norms/head, in bf16
    clip = [m for part in (model.text_encoder, model.vision_encoder) for m in part.modules() if isinstance(m, nn.Linear)]
    clip_bytes = {mode: storage_bytes(clip, mode, 2) for mode in MODES}
    rows, payload = [], {"parameters": total, "quantised_llm_weights": quantisable, "fp32_kept": fp32_kept,
                         "clip_linear_bytes": clip_bytes}
    for mode in MODES:
        llm_layers = storage_bytes(linears, mode, 2)
        whole = llm_layers + 2 * rest + 4 * fp32_kept
        payload[mode] = {"llm_layers_bytes": llm_layers, "model_bytes": whole}
        rows.append([f"paper size, LLM {'bf16' if mode == 'none' else mode} (arithmetic)", fmt(llm_layers / GiB),
                     fmt(whole / GiB), "", ""])
    return rows, payload


def write_medium_components(root: Path) -> Path:
    """Tiny CLIP/BERT/tokenizer of the tests, and a medium random Llama in their LLM folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vikdf.testing import write_tiny_components

    paths = write_tiny_components(root)
    config = AutoConfig.from_pretrained(paths.llm)
    config.update(MEDIUM_LLM)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(paths.llm)
    return root


def measure_one(root: Path, mode: str, steps: int) -> dict:
    """One precision, in this process: build, then `steps` timed dialogue fine-tuning steps after one warm-up."""
    from vikdf.training.components import build_vikdf_from_components
    from vikdf.training.quantization import LLMQuantizationArguments
    from vikdf.testing import TINY_HEADS

    quantization = LLMQuantizationArguments(llm_quantization=mode).bitsandbytes_config(torch.float32)
    contexts = [["a dog in the park", "is it playing with a red ball?"]] * 4
    libraries = rss_bytes()  # torch, transformers and bitsandbytes imported, before any weight
    torch.manual_seed(0)
    model, processor = build_vikdf_from_components(
        str(root / "clip"), str(root / "bert"), str(root / "llm-llama"), num_query_tokens=8,
        quantization_config=quantization, include_pretraining_heads=False, **TINY_HEADS,
    )
    model.set_trainable_stage("dialogue")
    footprint = model.get_memory_footprint()
    linears = quantised_linears(model.language_model)
    prefixes = tuple(f"language_model.{name}." for name in linears)
    llm_layers = sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name.startswith(prefixes))
    batch = processor.dialogue_batch(contexts, ["yes, and it looks very happy today."] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first is a warm-up
            times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"mode": mode, "peak_rss_bytes": peak_rss, "added_rss_bytes": peak_rss - libraries,
            "footprint_bytes": footprint, "llm_layers_bytes": llm_layers,
            "rule_llm_layers_bytes": storage_bytes(linears.values(), mode, 4), "step_s": statistics.median(times),
            "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per precision (after one warm-up).")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child process: one precision
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(Path(args.root), args.one, args.steps)))
        return

    paper_rows, paper = paper_size_rows()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_medium_components(Path(tmp))
        measured = [json.loads(subprocess.run(
            [sys.executable, __file__, "--one", mode, "--root", str(root), "--steps", str(args.steps)],
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]) for mode in MODES]
    rule = {m["mode"]: m for m in measured}
    rows = list(paper_rows)
    for m in measured:
        rows.append([f"medium, LLM {'fp32' if m['mode'] == 'none' else m['mode']} (measured)",
                     fmt(m["llm_layers_bytes"] / GiB, 3), fmt(m["footprint_bytes"] / GiB, 3),
                     fmt(m["added_rss_bytes"] / GiB, 3), fmt(m["step_s"], 3)])
    ratio = {mode: rule["none"]["step_s"] / rule[mode]["step_s"] for mode in MODES}
    info = machine_info(torch.device("cpu"))
    table = markdown_table(
        ["setting", "LLM layers GiB", "model GiB", "peak RSS added GiB", "step s"], rows
    )
    clip_bytes = paper["clip_linear_bytes"]
    rule_check = ", ".join(f"{m['mode']} {m['llm_layers_bytes'] / m['rule_llm_layers_bytes']:.3f}" for m in measured)
    markdown = "\n".join([
        "# The frozen LLM quantised: memory and step time", "",
        f"Command: `python benchmarks/bench_quantized_llm.py --steps {args.steps}`.", *machine_lines(info), "",
        table, "",
        "Step: dialogue fine-tuning on 4 dialogues (forward, backward to the queries through the LLM, AdamW), median "
        f"of {args.steps} after a warm-up. Speed relative to fp32: "
        + ", ".join(f"{mode} {ratio[mode]:.2f}×" for mode in MODES[1:]) + ". Model: "
        "`get_memory_footprint()` (weights and buffers). Peak RSS added: `ru_maxrss` of the process that built "
        "the model and ran the steps, less its RSS once the libraries were imported (the LLM is read in full precision, then quantised; on a CPU, bitsandbytes "
        "computes through dequantised copies of each layer's weights).",
        "", f"The storage rule against the medium model's measured quantised layers (measured / rule): {rule_check}.",
        "Paper-size rows: the LLM layers in the precision named, the IQ-Former and queries in fp32, everything else "
        "(CLIP towers, heads, the LLM's embeddings and output head) in bf16; weights only, no activations. The CLIP "
        f"towers stay unquantised: their linear layers are {clip_bytes['none'] / GiB:.2f} GiB in bf16 and would be "
        f"{clip_bytes['4bit'] / GiB:.2f} GiB in 4-bit, a saving of {(clip_bytes['none'] - clip_bytes['4bit']) / GiB:.2f} "
        "GiB, while TIM, TAMIM and IAMTM learn against their features.", "",
    ])
    print(markdown)
    write_results(f"quantized_llm_{device_slug(torch.device('cpu'))}", markdown,
                  {"paper_size": paper, "medium": measured, "speed_vs_fp32": ratio, "machine": info})


if __name__ == "__main__":
    main()
