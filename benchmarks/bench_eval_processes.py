"""Responses per second of `eval_dialogue.py` at 1 and 2 processes (`accelerate launch --num_processes N`), and
their ratio, on this machine's CPUs.

    python benchmarks/bench_eval_processes.py                        # tiny VIKDF, 72 synthetic dialogues
    python benchmarks/bench_eval_processes.py --dialogues 264 --processes 1 2 4

Each run is one `accelerate launch ... eval_dialogue.py` (beam 3, `no_repeat_ngram_size` 3, 16 new tokens, PPL
on), timed from launch to exit: process start, model loading and the metrics are included, which a short run at
toy size makes a large share. The runs check that their `predictions.jsonl` and `metrics.json` are identical. On a
2-core machine shared with other jobs expect a ratio well under 2 and noisy timings; on GPUs each process has its
own device.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench_common import ROOT, machine_info, machine_lines, markdown_table, write_results

from vikdf.training.components import build_vikdf_from_components
from vikdf.demo.world import write_synthetic_world
from vikdf.testing import TINY_HEADS, write_tiny_components


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dialogues", type=int, default=72, help="a multiple of the 12 image-only kinds")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_eval_processes_"))
    paths = write_tiny_components(work / "components", "llama")
    world = write_synthetic_world(
        work / "world", num_pairs=8, num_shards=1, num_heldout_pairs=2, num_dialogues=4,
        num_eval_dialogues=args.dialogues,
    )
    torch.manual_seed(0)
    model, processor = build_vikdf_from_components(
        str(paths.clip), str(paths.bert), str(paths.llm), num_query_tokens=8, **TINY_HEADS
    )
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows, results, outputs = [], [], {}
    for n in args.processes:
        out = work / f"out-{n}"
        # Without a GPU, accelerate starts several processes only through its torchrun launcher (--multi_gpu).
        command = [
            sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if n > 1 else []), "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
            "eval_dialogue.py", "--model_name_or_path", str(work / "model"), "--test_file", str(world.image_chat_test),
            "--output_dir", str(out), "--batch_size", str(args.batch_size), "--max_new_tokens", "16",
            "--precision", "fp32", "--disable_tqdm", "true", "--update_model_card", "false",
        ]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        outputs[n] = [(out / name).read_text() for name in ("predictions.jsonl", "metrics.json")]
        results.append({"processes": n, "seconds": seconds, "responses_per_second": args.dialogues / seconds})
    base = results[0]["responses_per_second"]
    for result in results:
        result["ratio_to_first"] = result["responses_per_second"] / base
        result["outputs_identical"] = outputs[result["processes"]] == outputs[args.processes[0]]
        rows.append([
            result["processes"], f"{result['seconds']:.1f}", f"{result['responses_per_second']:.2f}",
            f"{result['ratio_to_first']:.2f}", "yes" if result["outputs_identical"] else "NO",
        ])

    info = machine_info(torch.device("cpu"))
    markdown = "\n".join([
        "# eval_dialogue.py across processes",
        "",
        *machine_lines(info),
        f"- tiny VIKDF (random weights), {args.dialogues} synthetic Image-Chat dialogues, batch {args.batch_size}, "
        "beam 3, 16 new tokens, PPL on, CPU processes (one thread each)",
        "- seconds from `accelerate launch` to exit (start-up, model loading and metrics included); the machine is "
        "shared and has 2 cores, so the timings are noisy and the ratio is bounded by them",
        "",
        markdown_table(["processes", "s", "responses/s", f"ratio to {args.processes[0]}", "same outputs"], rows),
        "",
    ])
    md_path, _ = write_results("eval_processes_cpu_tiny", markdown, {"machine": info, "results": results}, args.output_dir)
    print(markdown)
    print(f"written: {md_path}")


if __name__ == "__main__":
    main()
