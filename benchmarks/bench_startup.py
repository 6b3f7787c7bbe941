"""Start-up cost, this checkout against `--before REF`: peak RSS after importing torch, transformers' `modeling_utils`
and the model (per interpreter of `--pythons`), and the wall time of the entry points' `--help`; fresh processes."""

from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import _bench_common as common  # puts the repository root on sys.path

IMPORTS = ("import torch", "import torch, transformers.modeling_utils", "import modeling_vikdf, processing_vikdf")
HELP_COMMANDS = ("train_pretrain.py", "train_dialogue.py", "eval_dialogue.py")
ROUNDS, RSS_TARGET_MIB, HELP_TARGET_S = 3, 450, 3.0
# VmHWM, the peak RSS of this process image: ru_maxrss would carry the spawning benchmark's own across exec.
PRINT_PEAK_RSS = "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
PRINT_VERSIONS = "import torch, transformers; print(torch.__version__, transformers.__version__)"


def run_in(tree: Path, python: str, argv: list[str]) -> tuple[float, str, int]:
    """(wall seconds, stdout, exit code) of `python argv` started at `tree` with `tree` on PYTHONPATH."""
    completed, seconds = common.timed(subprocess.run, [python, *argv], cwd=tree, capture_output=True, text=True,
                                      env={**os.environ, "PYTHONPATH": str(tree)}, timeout=600)
    return seconds, completed.stdout, completed.returncode


def measure(trees: dict[str, Path], pythons: list[str]) -> list[dict]:
    """Per tree, medians and exit codes of the imports with every interpreter and of `--help` with the first."""
    probes = [(python, f"RSS after `{statement}`", ["-c", f"{statement}\n{PRINT_PEAK_RSS}"])
              for python in pythons for statement in IMPORTS]
    probes += [(pythons[0], f"`python {command} --help`", [command, "--help"]) for command in HELP_COMMANDS]
    samples: dict[tuple, dict[str, list]] = {}
    for _ in range(ROUNDS):
        for python, what, argv in probes:
            for label, tree in trees.items():
                seconds, out, exit_code = run_in(tree, python, argv)
                if exit_code and what.startswith("RSS"):
                    raise RuntimeError(f"{python} {argv} failed in {tree}")
                value = int(out.split()[-1]) / 1024 if what.startswith("RSS") else seconds
                samples.setdefault((python, what), {}).setdefault(label, []).append((value, exit_code))
    return [{"python": python, "what": what, **{
        label: {"value": statistics.median(v for v, _ in values), "exit_codes": sorted({c for _, c in values})}
        for label, values in per_tree.items()}} for (python, what), per_tree in samples.items()]


def render(rows: list[dict], labels: list[str]) -> list[str]:
    def cell(what: str, measured: dict) -> str:
        if what.startswith("RSS"):
            return f"{measured['value']:.0f} MiB"
        exits = measured["exit_codes"]
        return f"{measured['value']:.2f} s" + (f" (exit {','.join(map(str, exits))})" if exits != [0] else "")

    def target(what: str, value: float) -> str:  # this checkout's value against the project's target
        if what == f"RSS after `{IMPORTS[-1]}`":
            return f"≤ {RSS_TARGET_MIB} MiB: {'met' if value <= RSS_TARGET_MIB else 'NOT met'}"
        if what == f"`python {HELP_COMMANDS[0]} --help`":
            return f"< {HELP_TARGET_S:g} s: {'met' if value < HELP_TARGET_S else 'NOT met'}"
        return ""

    compared = len(labels) == 2
    return [common.markdown_table(
        ["interpreter", "measurement", *labels, *(["before / after"] if compared else []), "target"],
        [[f"`{r['python']}`", r["what"], *(cell(r["what"], r[label]) for label in labels),
          *([f"{r[labels[0]]['value'] / r[labels[1]]['value']:.2f}x"] if compared else []),
          target(r["what"], r[labels[-1]]["value"])] for r in rows], align="ll" + "r" * (len(labels) + compared) + "l")]


def main(argv=None):
    parser = common.argument_parser(__doc__, sizes=None)
    parser.add_argument("--before", default=None, help="a git commit to measure next to this checkout")
    parser.add_argument("--pythons", nargs="+", default=[sys.executable], help="interpreters to measure with")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vikdf-before-") as scratch:
        trees = {f"before ({args.before})": Path(scratch)} if args.before else {}
        if args.before:  # the commit's tracked files, as a checkout of it has them
            archive = subprocess.run(["git", "archive", args.before], cwd=common.ROOT, check=True, capture_output=True)
            tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(scratch, filter="data")
        trees["after (this checkout)"] = common.ROOT
        versions = {python: run_in(common.ROOT, python, ["-c", PRINT_VERSIONS])[1].strip() for python in args.pythons}
        rows = measure(trees, args.pythons)
    common.publish("startup_cpu", "Start-up cost: memory after imports, time of --help", [
        "- trees: " + ", ".join(f"{label} = `{tree}`" for label, tree in trees.items()),
        f"- medians of {ROUNDS} interleaved rounds, each measurement a fresh process",
        *(f"- `{python}`: torch, transformers {version}" for python, version in versions.items()), "",
        *render(rows, list(trees))],
        {"args": vars(args), "versions": versions, "rows": rows, "trees": {k: str(v) for k, v in trees.items()}},
        args.output_dir)


if __name__ == "__main__":
    main()
