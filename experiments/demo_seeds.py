"""The demo over several seeds and both LLM families: mean ± sd of every row, and the demo's targets checked.

    python experiments/demo_seeds.py                                  # seeds 0 1 2, llama and qwen2, preset full
    python experiments/demo_seeds.py --seeds 0 1 2 --llm_families llama qwen2 --resume

Runs `demo.main` once per (family, seed) on the CPU and writes `results/demo_seeds_<preset>_cpu.{json,md}` after
every run (with `--resume`, runs already in the JSON are kept, not repeated). The markdown holds, per family and
over all runs, the mean ± sd (over runs) of each system's knowledge accuracy on the image-only test objects, on the
seen objects, of how often its textualised knowledge names the colour (reported, not a target: IACI cannot teach
the LLM to word a colour that only pixels showed) and BLEU-1, and the knowledge accuracy's 95 % interval from a
bootstrap over runs and object kinds; then the targets, judged on such intervals: VIKDF against the no-pre-training
ablation (paired by dialogue), against the frozen LLM and LoRA, and shuffled knowledge against chance.
`readme_table` in the JSON is the table the README quotes (a test checks that it does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _bench_common as common  # noqa: E402  (the machine record and result files; puts the repository root on sys.path)

import demo  # noqa: E402
from vikdf.evaluation.stats import nested_bootstrap_interval  # noqa: E402

CHANCE = 1 / 6
COLUMNS = (("knowledge_accuracy", "knowledge acc.", 100), ("knowledge_accuracy_seen", "(seen)", 100),
           ("textualised_accuracy", "textualised K names it", 100), ("bleu_1", "BLEU-1", 1))


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float | None], scale: float) -> str:
    present = [scale * v for v in values if v is not None]
    if not present:
        return "–"
    mean, sd = mean_sd(present)
    return f"{mean:.1f} ± {sd:.1f}"


def aggregate_table(runs: list[dict]) -> list[str]:
    """Markdown lines: one row per system, mean ± sd over `runs` of each column; the knowledge accuracy also with its
    95 % interval from the bootstrap over runs and kinds."""
    names = list(runs[0]["systems"])
    lines = ["| system (n = %d runs) | " % len(runs) + " | ".join(title for _, title, _ in COLUMNS)
             + " | knowledge acc., 95 % interval |",
             "| --- |" + " ---: |" * (len(COLUMNS) + 1)]
    for name in names:
        cells = [cell([run["systems"][name].get(key) for run in runs], scale) for key, _, scale in COLUMNS]
        _, low, high = pooled_interval(runs, name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | [{100 * low:.1f}, {100 * high:.1f}] |")
    return lines


def pooled_interval(runs: list[dict], system: str, reference: str | None = None) -> tuple[float, float, float]:
    """Knowledge accuracy of `system` (or its paired gain over `reference`) over `runs`, with the 95 % interval of a
    bootstrap that draws runs, then object kinds within each drawn run: kinds are what a model gets right or wrong."""
    def outcomes(run: dict, name: str) -> list:
        return run["systems"][name]["knowledge_outcomes"]

    if reference is None:
        return nested_bootstrap_interval([demo.accuracy_by_kind(outcomes(run, system)) for run in runs])
    return nested_bootstrap_interval([demo.gains_by_kind(outcomes(run, system), outcomes(run, reference))
                                      for run in runs])


def targets(runs: list[dict]) -> list[dict]:
    """The demo's targets over `runs`, each with the figures (in points) it was judged on."""
    checks = []
    gain, low, high = pooled_interval(runs, demo.VIKDF, demo.NO_PRETRAIN)
    per_run = [run["systems"][demo.VIKDF]["knowledge_accuracy"] - run["systems"][demo.NO_PRETRAIN]["knowledge_accuracy"]
               for run in runs]
    positive = sum(value > 0 for value in per_run)
    checks.append({"target": "VIKDF beats VIKDF without pre-training by ≥ 10 points, its 95 % interval excludes 0, "
                             "and it is positive in all runs but at most one",
                   "gain_points": 100 * gain, "low_points": 100 * low, "high_points": 100 * high,
                   "positive_runs": positive,
                   "met": gain >= 0.10 and low > 0 and positive >= len(runs) - 1})
    for baseline in (demo.FROZEN_LLM, demo.LORA):
        gain, low, high = pooled_interval(runs, demo.VIKDF, baseline)
        checks.append({"target": f"VIKDF beats {baseline} by ≥ 10 points",
                       "gain_points": 100 * gain, "low_points": 100 * low, "high_points": 100 * high,
                       "met": gain >= 0.10})
    value, low, high = pooled_interval(runs, demo.SHUFFLED)
    checks.append({"target": "VIKDF with shuffled knowledge: its 95 % interval contains chance (16.7 %)",
                   "value_percent": 100 * value, "low_percent": 100 * low, "high_percent": 100 * high,
                   "met": low <= CHANCE <= high})
    return checks


def target_lines(checks: list[dict]) -> list[str]:
    lines = []
    for check in checks:
        figures = ", ".join(f"{key.replace('_', ' ')} {value:.1f}" for key, value in check.items()
                            if isinstance(value, float))
        counts = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in check.items()
                           if isinstance(value, int) and not isinstance(value, bool))
        figures = ", ".join(filter(None, (figures, counts)))
        lines.append(f"- {'MET' if check['met'] else 'NOT met'}: {check['target']} ({figures})")
    return lines


def report(runs: list[dict], preset: str, info: dict) -> tuple[str, list[str]]:
    lines = [f"# Demo over seeds and LLM families — preset {preset} (CPU)", "", *common.machine_lines(info), ""]
    names = ", ".join(f"{run['llm_family']}/seed {run['seed']} ({run['seconds']:.0f} s)" for run in runs)
    lines += [f"Runs: {names}.",
              "Every cell is mean ± sd over runs, in % (BLEU-1 in points).", ""]
    readme = aggregate_table(runs)
    lines += ["## All runs", "", *readme, "", "### Targets", "", *target_lines(targets(runs)), ""]
    for family in sorted({run["llm_family"] for run in runs}):
        chosen = [run for run in runs if run["llm_family"] == family]
        lines += [f"## {family}", "", *aggregate_table(chosen), "", *target_lines(targets(chosen)), ""]
    stand_ins = [f"{run['llm_family']}/{run['seed']}: CLIP {run['stand_ins']['clip']['value']:.2f} after "
                 f"{run['stand_ins']['clip']['steps']} steps, LLM {run['stand_ins']['llm']['value']:.2f} after "
                 f"{run['stand_ins']['llm']['steps']}" for run in runs]
    pretraining = [f"{run['llm_family']}/{run['seed']}: {100 * run['pretraining_criterion']['value']:.0f} % after "
                   f"{run['pretraining_criterion']['steps']} steps (untrained "
                   f"{100 * run['pretraining_criterion']['untrained_value']:.0f} %)" for run in runs]
    lines += ["## Stand-in criteria reached", "", *[f"- {line}" for line in stand_ins], "",
              "## VIKDF pre-training: image-only look retrieval (TIM top-5, target 50 %)", "",
              *[f"- {line}" for line in pretraining], ""]
    return "\n".join(lines) + "\n", readme


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(demo.PRESETS), default="full")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--llm_families", nargs="+", default=["llama", "qwen2"])
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the result JSON")
    parser.add_argument("--freeze_iq_former", action="store_true",
                        help="the demo's switch beyond the paper: fine-tune the projection alone, on its own schedule "
                             "(results file demo_seeds_<preset>_frozen-iq-former_cpu)")
    parser.add_argument("--pretrain_steps", type=int, default=None,
                        help="cap of VIKDF pre-training steps instead of the preset's (results file "
                             "demo_seeds_<preset>[_frozen-iq-former]_<N>steps_cpu)")
    parser.add_argument("--output_dir", default=Path(__file__).resolve().parent / "results", type=Path)
    args = parser.parse_args(argv)
    info = common.machine_info(torch.device("cpu"))
    steps = [] if args.pretrain_steps is None else ["--pretrain_steps", str(args.pretrain_steps)]
    stem = (f"demo_seeds_{args.preset}{'_frozen-iq-former' if args.freeze_iq_former else ''}"
            f"{'' if args.pretrain_steps is None else f'_{args.pretrain_steps}steps'}_cpu")
    runs: list[dict] = []
    if args.resume and (args.output_dir / f"{stem}.json").exists():
        runs = json.loads((args.output_dir / f"{stem}.json").read_text())["runs"]
    payload: dict = {}
    for family in args.llm_families:
        for seed in args.seeds:
            if any(run["llm_family"] == family and run["seed"] == seed for run in runs):
                continue
            with tempfile.TemporaryDirectory(prefix="vikdf-demo-") as workdir:
                summary = demo.main(["--preset", args.preset, "--seed", str(seed), "--llm_family", family,
                                     "--output_dir", workdir, "--freeze_iq_former", str(args.freeze_iq_former),
                                     *steps])
            summary["num_eval_dialogues"] = demo.PRESETS[args.preset]["num_eval_dialogues"]
            summary["printed_table"] = [demo.table_row(name, row) for name, row in summary["systems"].items()]
            runs.append(summary)
            # The raw runs first, so that a run is never lost to a failure of the report below.
            args.output_dir.mkdir(parents=True, exist_ok=True)
            (args.output_dir / f"{stem}.json").write_text(json.dumps({"machine": info, "runs": runs}, indent=2, default=str))
            markdown, readme = report(runs, args.preset, info)
            payload = {"machine": info, "runs": runs, "readme_table": readme, "targets": targets(runs)}
            common.write_results(stem, markdown, payload, args.output_dir)
            print(markdown, flush=True)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
