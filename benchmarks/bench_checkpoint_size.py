"""Bytes of one pre-training checkpoint: the whole model (`--save_full_model`, every checkpoint before) against the
trainable parameters only (the default now, `vikdf.training.trainable_checkpoints`), at tiny, medium and paper size.

    python benchmarks/bench_checkpoint_size.py

Measured: `train_pretrain.py` from a saved VIKDF with random weights, one step on synthetic shards (fp32, AdamW,
batch 2), `checkpoint-1` written both ways; the folder's bytes, split into the weights file (`model.safetensors` or
`trainable.safetensors`), the optimizer state (`optimizer.pt`) and the rest (config, trainer state, RNG, scheduler,
pair stream, frozen-parts record, processor files). tiny = `vikdf.testing`'s components; medium =
`medium_vikdf_config` of `bench_pretrain_step.py` (width 256, 4 layers, CLIP's and Llama-2's vocabularies, n = 32).

Arithmetic (not measured): paper size, from the parameter counts of `VIKDFConfig()` built on the meta device (CLIP
ViT-L/14, BERT-base IQ-Former, Llama-2-7B): weights as `from_pretrained(dtype=bf16)` holds them (the IQ-Former and
its queries fp32, `_keep_in_fp32_modules`; the rest bf16), AdamW's state as 2 fp32 tensors per trainable parameter;
the few small files are left out. Pre-training trains 158.6M parameters, dialogue fine-tuning 102.4M (paper §3.4.1).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _bench_common import machine_info, machine_lines, markdown_table, write_results
from bench_pretrain_step import medium_vikdf_config
from transformers import CLIPImageProcessor

import train_pretrain
from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration
from vikdf.training.components import build_vikdf_from_components
from vikdf.demo.world import write_synthetic_world
from vikdf.testing import TINY_HEADS, write_tiny_components
from vikdf.training.trainable_checkpoints import TRAINABLE_WEIGHTS_NAME

ADAMW_BYTES_PER_PARAMETER = 8  # exp_avg and exp_avg_sq, fp32


def _start_folder(size: str, components, folder: Path) -> Path:
    """A saved VIKDF to pre-train from: the tiny one built from `components`, or a medium one with random weights
    that takes the tiny processor's tokenizers (their ids fit the medium vocabularies) and 112-pixel images."""
    model, processor = build_vikdf_from_components(
        str(components.clip), str(components.bert), str(components.llm),
        num_query_tokens=8 if size == "tiny" else 32, **TINY_HEADS,
    )  # fmt: skip
    if size == "medium":
        config = medium_vikdf_config()
        config.knowledge_token_id = processor.knowledge_token_id
        model = VIKDFForConditionalGeneration(config)
        processor.image_processor = CLIPImageProcessor(
            size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}
        )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _measure(start: Path, shards: str, output_dir: Path, full: bool) -> dict:
    """One pre-training step from `start`, saved as `checkpoint-1`; its bytes by kind."""
    argv = [
        "--model_name_or_path", str(start), "--train_sources", "wds:" + shards, "--output_dir", str(output_dir),
        "--max_steps", "1", "--save_steps", "1", "--per_device_train_batch_size", "2", "--shuffle_buffer", "4",
        "--precision", "fp32", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        "--save_full_model", str(full).lower(),
    ]  # fmt: skip
    trainer = train_pretrain.main(argv)
    checkpoint = output_dir / "checkpoint-1"
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    weights_name = "model.safetensors" if full else TRAINABLE_WEIGHTS_NAME
    parameters = list(trainer.model.parameters())
    return {
        "total": sum(files.values()),
        "weights": files[weights_name],
        "optimizer": files["optimizer.pt"],
        "rest": sum(files.values()) - files[weights_name] - files["optimizer.pt"],
        "files": files,
        "parameters": sum(p.numel() for p in parameters),
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
    }


def _paper_arithmetic(stage: str) -> dict:
    """Bytes of a paper-size checkpoint of `stage`, by arithmetic on the meta-device model (module docstring)."""
    with torch.device("meta"):
        model = VIKDFForConditionalGeneration(VIKDFConfig(knowledge_token_id=32000, text_config={"vocab_size": 32001}))
    if stage == "dialogue":
        model.drop_pretraining_heads()
    model.set_trainable_stage(stage)
    fp32 = tuple(model._keep_in_fp32_modules)

    def nbytes(name: str, parameter) -> int:
        return parameter.numel() * (4 if name.split(".")[0] in fp32 else 2)

    named = list(model.named_parameters())
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    optimizer = trainable * ADAMW_BYTES_PER_PARAMETER
    whole = sum(nbytes(n, p) for n, p in named)
    trained = sum(nbytes(n, p) for n, p in named if p.requires_grad)
    return {
        "before": {"total": whole + optimizer, "weights": whole, "optimizer": optimizer, "rest": 0},
        "after": {"total": trained + optimizer, "weights": trained, "optimizer": optimizer, "rest": 0},
        "parameters": sum(p.numel() for _, p in named),
        "trainable": trainable,
    }


def _bytes(value: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=("tiny", "medium"), default=["tiny", "medium"])
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_size_"))
    components = write_tiny_components(work / "components", "llama")
    world = write_synthetic_world(work / "world", num_pairs=16, num_shards=1, num_heldout_pairs=4, num_dialogues=4)
    results = []
    for size in args.sizes:
        start = _start_folder(size, components, work / f"start-{size}")
        before = _measure(start, world.train_shards, work / f"{size}-full", full=True)
        after = _measure(start, world.train_shards, work / f"{size}-trainable", full=False)
        results.append({"size": size, "stage": "pretrain", "how": "measured", "before": before, "after": after,
                        "parameters": before["parameters"], "trainable": before["trainable"]})
    for stage in ("pretrain", "dialogue"):
        results.append({"size": "paper", "stage": stage, "how": "arithmetic", **_paper_arithmetic(stage)})

    rows = [
        [
            row["size"], row["stage"], row["how"],
            f"{row['parameters'] / 1e6:,.1f}M", f"{row['trainable'] / 1e6:,.1f}M",
            _bytes(row["before"]["total"]), _bytes(row["after"]["total"]),
            f"{row['after']['total'] / row['before']['total']:.3f}",
            _bytes(row["before"]["weights"]), _bytes(row["after"]["weights"]), _bytes(row["after"]["optimizer"]),
            _bytes(row["after"]["rest"]) if row["how"] == "measured" else "–",
        ]
        for row in results
    ]
    info = machine_info(torch.device("cpu"))
    markdown = "\n".join([
        "# Bytes of one checkpoint: whole model against trainable parameters",
        "",
        *machine_lines(info),
        "- measured: `train_pretrain.py`, one step (fp32, AdamW, batch 2) from a saved VIKDF with random weights, "
        "`checkpoint-1` with `--save_full_model` (before) and without (after)",
        "- arithmetic: paper size from the meta-device parameter counts, bf16 weights with the IQ-Former and queries "
        f"in fp32, AdamW state {ADAMW_BYTES_PER_PARAMETER} bytes per trainable parameter; small files left out",
        "- weights: `model.safetensors` before, `trainable.safetensors` after; other files: config, trainer state, "
        "RNG, scheduler, pair stream and frozen-parts record (measured rows, after)",
        "",
        markdown_table(
            ["size", "stage", "how", "parameters", "trainable", "checkpoint before", "checkpoint after",
             "after / before", "weights before", "weights after", "optimizer state", "other files after"],
            rows, align="lllrrrrrrrrr",
        ),
        "",
    ])
    md_path, _ = write_results("checkpoint_size_cpu", markdown, {"machine": info, "results": results}, args.output_dir)
    print(markdown)
    print(f"written: {md_path}")


if __name__ == "__main__":
    main()
