"""Responses per second of `eval_dialogue.py` at 1 and 2 CPU processes (`accelerate launch`), from launch to exit, their
ratio, and whether their `predictions.jsonl` and `metrics.json` are identical."""

from __future__ import annotations

import os
import subprocess
import sys

import _bench_common as common  # puts the repository root on sys.path
import torch
from torch.distributed.elastic.utils.distributed import get_free_port

PROCESSES, BATCH_SIZE = (1, 2), 8


def main() -> None:
    parser = common.argument_parser(__doc__, sizes=None)
    parser.add_argument("--dialogues", type=int, default=72, help="a multiple of the 12 image-only kinds")
    args = parser.parse_args()

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    results, outputs = [], {}
    with common.tiny_workspace(num_pairs=8, num_eval_dialogues=args.dialogues) as (work, parts, world):
        torch.manual_seed(0)
        for part in common.tiny_vikdf(parts):  # the model, then its processor
            part.save_pretrained(work / "model")
        for n in PROCESSES:
            # Without a GPU, accelerate starts several processes only through its torchrun launcher (--multi_gpu).
            launch = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if n > 1 else []),
                      *common.cli(num_processes=n, num_machines=1, mixed_precision="no", dynamo_backend="no",
                                  main_process_port=get_free_port()), "eval_dialogue.py"]
            evaluation = common.cli(model_name_or_path=work / "model", test_file=world.image_chat_test,
                                    output_dir=work / f"out-{n}", batch_size=BATCH_SIZE, max_new_tokens=16,
                                    precision="fp32", disable_tqdm="true", update_model_card="false")
            _, seconds = common.timed(subprocess.run, launch + evaluation, cwd=common.ROOT, env=env, check=True,
                                      capture_output=True)
            outputs[n] = [(work / f"out-{n}" / name).read_text() for name in ("predictions.jsonl", "metrics.json")]
            results.append({"processes": n, "seconds": seconds, "responses_per_second": args.dialogues / seconds,
                            "ratio_to_first": results[0]["seconds"] / seconds if results else 1.0,
                            "outputs_identical": outputs[n] == outputs[PROCESSES[0]]})

    common.publish("eval_processes_cpu_tiny", "eval_dialogue.py across processes", [
        f"- tiny VIKDF (random weights), {args.dialogues} synthetic Image-Chat dialogues, batch {BATCH_SIZE}, 16 new "
        "tokens, PPL on, CPU processes (one thread each); seconds from `accelerate launch` to exit", "",
        common.markdown_table(["processes", "s", "responses/s", f"ratio to {PROCESSES[0]}", "same outputs"],
                              [[r["processes"], f"{r['seconds']:.1f}", f"{r['responses_per_second']:.2f}",
                                f"{r['ratio_to_first']:.2f}", "yes" if r["outputs_identical"] else "NO"]
                               for r in results])], {"results": results}, args.output_dir)


if __name__ == "__main__":
    main()
