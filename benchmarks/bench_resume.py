"""Time to the first resumed pre-training step at k = 10, 100, 1000: restoring the pair stream's saved position
(now) against reading the k consumed batches again to skip them (before), in one run.

    python benchmarks/bench_resume.py                      # tiny model, synthetic shards, this machine
    python benchmarks/bench_resume.py --steps 10 100 1000 --batch_size 2

One `train_pretrain.py` run (tiny components, `wds:` synthetic shards, shuffle buffer 100) saves checkpoints at
every k. Each k is then resumed twice to step k + 1: from the checkpoint as saved ("restore": the loader loads
`pair_stream_0.safetensors`), and from a copy without that file ("re-read": the Trainer's fallback, what every
resume did before, iterating over the k consumed batches). Measured: seconds from `trainer.train()` to the end of the first
resumed step, and the images the stream decoded until then (exact, unlike the timings). Timings on a shared machine
are noisy; what matters is flat (restore) against growing with k (re-read).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _bench_common import machine_info, machine_lines, markdown_table, write_results
from transformers import TrainerCallback

import train_pretrain
from vikdf.data import pairs
from vikdf.demo.world import write_synthetic_world
from vikdf.testing import TINY_HEADS, write_tiny_components
from vikdf.training.trainers import VIKDFPretrainTrainer, stream_state_name


class _SaveAt(TrainerCallback):
    def __init__(self, steps: set[int]):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps


class _TimedTrainer(VIKDFPretrainTrainer):
    """Records the seconds from `train()` to the end of its first step; adds `extra_callbacks`."""

    first_step_seconds: float | None = None
    extra_callbacks: tuple[TrainerCallback, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, callbacks=list(self.extra_callbacks), **kwargs)

    def train(self, *args, **kwargs):
        self._started = time.perf_counter()
        return super().train(*args, **kwargs)

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.first_step_seconds is None:
            type(self).first_step_seconds = time.perf_counter() - self._started
        return loss


def _run(argv: list[str]) -> tuple[float | None, int]:
    """train_pretrain.main(argv) with the timed trainer; (first-step seconds, images decoded)."""
    decoded = 0
    make_pair = pairs._make_pair

    def counting(record, skips):
        nonlocal decoded
        decoded += 1
        return make_pair(record, skips)

    _TimedTrainer.first_step_seconds = None
    pairs._make_pair, train_pretrain.VIKDFPretrainTrainer = counting, _TimedTrainer
    try:
        train_pretrain.main(argv)
    finally:
        pairs._make_pair, train_pretrain.VIKDFPretrainTrainer = make_pair, VIKDFPretrainTrainer
    return _TimedTrainer.first_step_seconds, decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--shuffle_buffer", type=int, default=100)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_resume_"))
    components = write_tiny_components(work / "components", "llama")
    world = write_synthetic_world(work / "world", num_pairs=512, num_shards=8, num_heldout_pairs=4, num_dialogues=4)
    common = {
        "clip_model": components.clip, "bert_model": components.bert, "llm_model": components.llm,
        "num_query_tokens": 8, "config_overrides": json.dumps(TINY_HEADS), "train_sources": "wds:" + world.train_shards,
        "per_device_train_batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer, "precision": "fp32",
        "report_to": "none", "disable_tqdm": True, "dataloader_pin_memory": False, "logging_steps": 1000,
        "seed": args.seed, "save_strategy": "no",
    }

    def argv(**options) -> list[str]:
        return [token for name, value in {**common, **options}.items() for token in (f"--{name}", str(value))]

    # One run saves every checkpoint (`save_strategy no` + a callback: only these steps, no others).
    train_dir = work / "train"
    _TimedTrainer.extra_callbacks = (_SaveAt(set(args.steps)),)
    started = time.perf_counter()
    _run(argv(output_dir=train_dir, max_steps=max(args.steps)))
    training_seconds = time.perf_counter() - started
    _TimedTrainer.extra_callbacks = ()

    rows, results = [], []
    for k in args.steps:
        saved = train_dir / f"checkpoint-{k}"
        reread = work / f"reread-{k}" / saved.name
        shutil.copytree(saved, reread)
        (reread / stream_state_name(0)).unlink()
        measured = {}
        for mode, checkpoint in (("restore", saved), ("re-read", reread)):
            seconds, decoded = _run(
                argv(output_dir=work / f"resume-{mode}-{k}", max_steps=k + 1, resume_from_checkpoint=checkpoint)
            )
            measured[mode] = {"seconds": seconds, "decoded": decoded}
        results.append({"k": k, **measured})
        rows.append([
            k, f"{measured['restore']['seconds']:.2f}", measured["restore"]["decoded"],
            f"{measured['re-read']['seconds']:.2f}", measured["re-read"]["decoded"],
        ])
    shutil.rmtree(work, ignore_errors=True)

    info = machine_info(torch.device("cpu"))
    markdown = "\n".join([
        "# Time to the first resumed pre-training step",
        "",
        *machine_lines(info),
        f"- tiny components, `wds:` synthetic shards (512 pairs, 8 shards), batch {args.batch_size}, shuffle buffer "
        f"{args.shuffle_buffer}, 1 process, no DataLoader workers; the checkpoints came from one {max(args.steps)}-step "
        f"run ({training_seconds:.0f} s)",
        "- restore: the loader loads the checkpoint's `pair_stream_0.safetensors`; re-read: the same checkpoint "
        "without it, "
        "the Trainer iterating over the k consumed batches (every resume before this change)",
        "- seconds from `trainer.train()` to the end of the first resumed step (model and checkpoint loading "
        "included); decoded = images the stream decoded until then, exact. The machine is shared: timings are noisy.",
        "",
        markdown_table(
            ["k", "restore: s", "restore: decoded", "re-read: s", "re-read: decoded"], rows
        ),
        "",
    ])
    md_path, _ = write_results("resume_cpu_tiny", markdown, {"machine": info, "results": results}, args.output_dir)
    print(markdown)
    print(f"written: {md_path}")


if __name__ == "__main__":
    main()
