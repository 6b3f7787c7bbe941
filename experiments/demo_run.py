"""Time the demo (`python demo.py`, the README's first command after the install) against its 5-minute budget.

    python experiments/demo_run.py                         # the default preset, as `python demo.py` runs it
    python experiments/demo_run.py --preset full           # every row (the seed benchmark's runs)
    python experiments/demo_run.py --preset tables         # with the Table 3 pre-training ablations
    python experiments/demo_run.py --preset smoke          # the tests' setting
    python experiments/demo_run.py --preset real-llm       # SmolLM2-135M-Instruct as the frozen LLM (30-minute budget)
    python experiments/demo_run.py --pretrain_steps 3000   # a higher cap of pre-training steps

Runs `demo.main` in this process on the CPU and writes `results/demo_<preset>[_<N>steps]_cpu.{md,json}`: the time
since the start at the end of each of the six stages, the total against the budget, and what the run measured
(knowledge accuracy per system with its interval over kinds, the pre-training criterion, TIM recall@1 against
chance, whether the stand-in LLM uses its prompt), so that a timing always comes with the results it produced.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _bench_common as common  # noqa: E402  (the machine record and result files; puts the repository root on sys.path)

import demo  # noqa: E402

# The demo's own part, install aside, on 2 CPU cores; the real-LLM preset's (its SmolLM2 conversion cached) is 30 min.
BUDGET_SECONDS = {"default": 300, "real-llm": 1800}


def report(summary: dict, preset: str, info: dict) -> str:
    lines = [f"# Demo timing — {info['device']} — preset {preset} (CPU)", "", *common.machine_lines(info), ""]
    previous = 0.0
    rows = []
    for stage, at in summary["stage_seconds"].items():
        rows.append([stage, f"{at - previous:.1f}", f"{at:.1f}"])
        previous = at
    lines += [common.markdown_table(["stage", "seconds", "since start"], rows), ""]
    total = summary["seconds"]
    if preset in BUDGET_SECONDS:
        verdict = "within" if total <= BUDGET_SECONDS[preset] else "OVER"
        lines += [f"Total **{total:.0f} s**, {verdict} the {BUDGET_SECONDS[preset]} s budget.", ""]
    else:
        lines += [f"Total **{total:.0f} s** (a budget is set for {' and '.join(BUDGET_SECONDS)} only).", ""]
    lines += ["The demo's Table-1 rows (Average, Extrema, Greedy: GloVe 6B 50d):", "", *demo.table_header(),
              *(demo.table_row(name, row) for name, row in summary["systems"].items()), ""]
    systems = [[name, f"{100 * m['knowledge_accuracy']:.1f}",
                "[{:.1f}, {:.1f}]".format(*(100 * bound for bound in m["knowledge_accuracy_interval"])),
                f"{100 * m['knowledge_accuracy_seen']:.1f}",
                "–" if m["textualised_accuracy"] is None else f"{100 * m['textualised_accuracy']:.1f}"]
               for name, m in summary["systems"].items()]
    headers = ["system", "knowledge acc. (image-only objects)", "95 % interval over kinds", "(seen objects)",
               "textualised K names the colour"]
    lines += [common.markdown_table(headers, systems), ""]
    if summary.get("figure7"):
        rows = [[n, *("{:.1f} [{:.1f}, {:.1f}]".format(*values) for values in columns.values())]
                for n, columns in summary["figure7"].items()]
        lines += [f"Fig. 7: VIKDF with n query vectors, each pre-trained {summary['pretraining_criterion']['steps']} "
                  "steps and fine-tuned alike (95 % intervals over the image-only kinds):", "",
                  common.markdown_table(["n", "knowledge acc.", "BLEU-1", "ROUGE-L"], rows), ""]
    recall, chance = summary["tim_recall_at_1"], summary["tim_chance"]
    use = summary["llm_prompt_use"]
    lines += [
        f"TIM text→image recall@1: {100 * recall:.1f} % (chance {100 * chance:.1f} %, {recall / chance:.1f}×).",
        f"The LLM ({summary['llm_family']}) names the colour its prompt describes: {100 * use['described']:.0f} % "
        f"(without the description {100 * use['plain']:.0f} %).",
        *[f"Stand-in {name}: {s['criterion']} {100 * s['value']:.0f} % (target {100 * s['target']:.0f} %) after "
          f"{s['steps']} steps." for name, s in summary["stand_ins"].items()],
        "VIKDF pre-training: {criterion} {value:.0f} % (target {target:.0f} %, untrained {untrained:.0f} %) after "
        "{steps} steps.".format(criterion=summary["pretraining_criterion"]["criterion"],
                                value=100 * summary["pretraining_criterion"]["value"],
                                target=100 * summary["pretraining_criterion"]["target"],
                                untrained=100 * summary["pretraining_criterion"]["untrained_value"],
                                steps=summary["pretraining_criterion"]["steps"]),
        "", "Examples (VIKDF, and the frozen LLM on the same context):", "",
        *(line for example in summary["examples"] for line in (*(f"- {key}: {value}" for key, value in
                                                                  example.items()), "")),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(demo.PRESETS), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_steps", type=int, default=None,
                        help="cap of VIKDF pre-training steps instead of the preset's (results file "
                             "demo_<preset>_<N>steps)")
    parser.add_argument("--output_dir", default=Path(__file__).resolve().parent / "results", type=Path)
    args = parser.parse_args(argv)
    info = common.machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="vikdf-demo-") as workdir:
        steps = [] if args.pretrain_steps is None else ["--pretrain_steps", str(args.pretrain_steps)]
        summary = demo.main(["--preset", args.preset, "--seed", str(args.seed), "--output_dir", workdir, *steps])
    # A changed schedule gets its own results file, and the 5-minute budget is judged on the README's run only.
    name = args.preset if args.pretrain_steps is None else f"{args.preset}_{args.pretrain_steps}steps"
    markdown = report(summary, name, info)
    print(markdown)
    paths = common.write_results(f"demo_{name}_cpu", markdown, {"machine": info, "summary": summary},
                                 args.output_dir)
    print(f"wrote {paths[0]} and {paths[1]}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
