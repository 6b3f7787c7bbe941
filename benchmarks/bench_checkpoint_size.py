"""Bytes of one pre-training checkpoint, the whole model (`--save_full_model`) against the trainable parameters only,
split into weights, optimizer state and the rest: measured at tiny and medium size, by arithmetic at paper size."""

from __future__ import annotations

from pathlib import Path

import _bench_common as common  # puts the repository root on sys.path
import torch
from transformers import CLIPImageProcessor

import train_pretrain
from modeling_vikdf import VIKDFForConditionalGeneration
from vikdf.training.trainable_checkpoints import TRAINABLE_WEIGHTS_NAME

ADAMW_BYTES_PER_PARAMETER = 8  # exp_avg and exp_avg_sq, fp32


def start_folder(size: str, components, folder: Path) -> Path:
    """A saved VIKDF to pre-train from: the tiny one, or a medium one with the tiny tokenizers and 112-pixel images."""
    model, processor = common.tiny_vikdf(components, num_query_tokens=8 if size == "tiny" else 32)
    if size == "medium":
        model = VIKDFForConditionalGeneration(common.model_config("medium",
                                                                  knowledge_token_id=processor.knowledge_token_id))
        processor.image_processor = CLIPImageProcessor(size={"shortest_edge": 112},
                                                       crop_size={"height": 112, "width": 112})
    for part in (model, processor):
        part.save_pretrained(folder)
    return folder


def measure(start: Path, shards: str, output_dir: Path, full: bool) -> dict:
    """One pre-training step (fp32, AdamW, batch 2) from `start`, saved as `checkpoint-1`; its bytes by kind."""
    model = train_pretrain.main(common.cli(
        model_name_or_path=start, train_sources="wds:" + shards, output_dir=output_dir, max_steps=1, save_steps=1,
        per_device_train_batch_size=2, shuffle_buffer=4, precision="fp32", report_to="none", disable_tqdm="true",
        dataloader_pin_memory="false", save_full_model=str(full).lower())).model
    checkpoint = output_dir / "checkpoint-1"
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*")) if p.is_file()}
    weights = files["model.safetensors" if full else TRAINABLE_WEIGHTS_NAME]
    return {"total": sum(files.values()), "weights": weights, "optimizer": files["optimizer.pt"],
            "rest": sum(files.values()) - weights - files["optimizer.pt"], "files": files,
            "parameters": model.num_parameters(), "trainable": model.num_parameters(only_trainable=True)}


def paper_arithmetic(stage: str) -> dict:
    """A paper-size checkpoint of `stage`: bf16 weights (fp32 kept), AdamW's state; the few small files left out."""
    with torch.device("meta"):
        model = VIKDFForConditionalGeneration(common.model_config("paper"))
    if stage == "dialogue":
        model.drop_pretraining_heads()
    model.set_trainable_stage(stage)
    trainable = model.num_parameters(only_trainable=True)
    optimizer, whole, trained = (trainable * ADAMW_BYTES_PER_PARAMETER, common.bf16_weight_bytes(model),
                                 common.bf16_weight_bytes(model, trainable_only=True))
    return {"before": {"total": whole + optimizer, "weights": whole, "optimizer": optimizer, "rest": 0},
            "after": {"total": trained + optimizer, "weights": trained, "optimizer": optimizer, "rest": 0},
            "parameters": model.num_parameters(), "trainable": trainable}


def readable(value: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= scale:
            return f"{value / scale:,.2f} {unit}"
    return f"{value} B"


def main() -> None:
    args = common.argument_parser(__doc__, sizes=None).parse_args()
    results = []
    with common.tiny_workspace(num_pairs=16) as (work, tiny, world):
        for size in ("tiny", "medium"):
            start = start_folder(size, tiny, work / f"start-{size}")
            before = measure(start, world.train_shards, work / f"{size}-full", full=True)
            after = measure(start, world.train_shards, work / f"{size}-trainable", full=False)
            results.append({"size": size, "stage": "pretrain", "how": "measured", "before": before, "after": after,
                            "parameters": before["parameters"], "trainable": before["trainable"]})
    results += [{"size": "paper", "stage": stage, "how": "arithmetic", **paper_arithmetic(stage)}
                for stage in ("pretrain", "dialogue")]

    rows = []
    for r in results:
        before, after = r["before"], r["after"]
        rows.append([r["size"], r["stage"], r["how"], f"{r['parameters'] / 1e6:,.1f}M", f"{r['trainable'] / 1e6:,.1f}M",
                     readable(before["total"]), readable(after["total"]), f"{after['total'] / before['total']:.3f}",
                     readable(before["weights"]), readable(after["weights"]), readable(after["optimizer"]),
                     readable(after["rest"]) if r["how"] == "measured" else "–"])
    common.publish("checkpoint_size_cpu", "Bytes of one checkpoint: whole model against trainable parameters", [
        "- before: `--save_full_model`, weights in `model.safetensors`; after: the default, `trainable.safetensors`; "
        f"paper-size rows by arithmetic, AdamW state {ADAMW_BYTES_PER_PARAMETER} bytes per trainable parameter", "",
        common.markdown_table(["size", "stage", "how", "parameters", "trainable", "checkpoint before",
                               "checkpoint after", "after / before", "weights before", "weights after",
                               "optimizer state", "other files after"], rows, align="lllrrrrrrrrr")],
        {"results": results}, args.output_dir)


if __name__ == "__main__":
    main()
