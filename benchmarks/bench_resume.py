"""Time to the first resumed pre-training step at k = 10, 100, 1000: restoring the pair stream's saved position
(now) against reading the k consumed batches again to skip them (before), and the images decoded until then."""

from __future__ import annotations

import json
import shutil
import time
from unittest import mock

import _bench_common as common  # puts the repository root on sys.path
from transformers import TrainerCallback

import train_pretrain
from vikdf.data import pairs
from vikdf.testing import TINY_HEADS
from vikdf.training.trainers import stream_state_name

BATCH_SIZE, SHUFFLE_BUFFER = 2, 100


class FirstStepClock(TrainerCallback):
    """Seconds from the Trainer's creation (`train()` follows) to its first step's end; saves at `save_at` only."""

    def __init__(self, save_at=()):
        self.save_at, self.seconds, self.started = set(save_at), None, None

    def on_init_end(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.started
        control.should_save = state.global_step in self.save_at


def run(argv: list[str], clock: FirstStepClock) -> tuple[float, int]:
    """`train_pretrain.main(argv)` with `clock`: (its seconds to the first step's end, images the stream decoded)."""
    with mock.patch.object(pairs, "_make_pair", wraps=pairs._make_pair) as make_pair:
        train_pretrain.main(argv, callbacks=[clock])
    return clock.seconds, make_pair.call_count


def main() -> None:
    parser = common.argument_parser(__doc__, sizes=None)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()

    results = []
    with common.tiny_workspace(num_pairs=512, num_shards=8) as (work, parts, world):
        def argv(**options) -> list[str]:
            return common.cli(
                clip_model=parts.clip, bert_model=parts.bert, llm_model=parts.llm, num_query_tokens=8,
                config_overrides=json.dumps(TINY_HEADS), train_sources="wds:" + world.train_shards,
                per_device_train_batch_size=BATCH_SIZE, shuffle_buffer=SHUFFLE_BUFFER, precision="fp32",
                report_to="none", disable_tqdm=True, dataloader_pin_memory=False, logging_steps=1000, seed=0,
                save_strategy="steps", save_steps=1, **options)  # a stream snapshot every step; saves: the clock's

        _, training_seconds = common.timed(run, argv(output_dir=work / "train", max_steps=max(args.steps)),
                                           FirstStepClock(save_at=args.steps))
        for k in args.steps:
            saved, reread = work / "train" / f"checkpoint-{k}", work / f"reread-{k}" / f"checkpoint-{k}"
            shutil.copytree(saved, reread)
            (reread / stream_state_name(0)).unlink()
            result = {"k": k}
            for mode, checkpoint in (("restore", saved), ("re-read", reread)):
                seconds, decoded = run(argv(output_dir=work / f"resume-{mode}-{k}", max_steps=k + 1,
                                            resume_from_checkpoint=checkpoint), FirstStepClock())
                result[mode] = {"seconds": seconds, "decoded": decoded}
            results.append(result)

    common.publish("resume_cpu_tiny", "Time to the first resumed pre-training step", [
        f"- batch {BATCH_SIZE}, shuffle buffer {SHUFFLE_BUFFER}; the checkpoints came from one "
        f"{max(args.steps)}-step run ({training_seconds:.0f} s); re-read: the checkpoint without "
        f"`{stream_state_name(0)}`", "",
        common.markdown_table(["k", "restore: s", "restore: decoded", "re-read: s", "re-read: decoded"],
                              [[r["k"], f"{r['restore']['seconds']:.2f}", r["restore"]["decoded"],
                                f"{r['re-read']['seconds']:.2f}", r["re-read"]["decoded"]] for r in results])],
        {"results": results}, args.output_dir)


if __name__ == "__main__":
    main()
