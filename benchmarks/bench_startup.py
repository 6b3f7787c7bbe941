"""Start-up cost: resident memory right after importing the model, and the wall time of the entry points' `--help`,
for this checkout and (with `--before REF`) an earlier commit, in fresh interpreters, interleaved in one run.

    python benchmarks/bench_startup.py --before a061a00
    python benchmarks/bench_startup.py --before a061a00 --pythons .venv/bin/python /tmp/cpu-torch-venv/bin/python

Each measurement is a new process started from the tree's root with the tree on PYTHONPATH (peak RSS, `VmHWM`, for
memory, wall time from spawn to exit for `--help`); medians over `--rounds` interleaved rounds. The import rows
separate what is ours from what comes before it: `import torch` alone, then torch with transformers'
`modeling_utils` (what any transformers model imports), then `modeling_vikdf, processing_vikdf`. `--pythons` runs
the import rows once per interpreter (e.g. one with torch's CUDA wheel and one with its CPU wheel, whose
`import torch` differ by hundreds of MiB; the second needs only torch and transformers); `--help` runs with the
first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402  (puts the repository root on sys.path)

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = {
    "import torch": "import torch",
    "+ transformers.modeling_utils": "import torch, transformers.modeling_utils",
    "import modeling_vikdf, processing_vikdf": "import modeling_vikdf, processing_vikdf",
}
HELP_COMMANDS = ("train_pretrain.py", "train_dialogue.py", "eval_dialogue.py")
RSS_TARGET_MIB, HELP_TARGET_S = 450, 3.0


def run_in(tree: Path, python: str, argv: list[str]) -> tuple[float, str, int]:
    """(wall seconds, stdout, exit code) of `python argv` started at `tree` with `tree` first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    completed = subprocess.run([python, *argv], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, completed.stdout, completed.returncode


def import_rss_mib(tree: Path, python: str, statement: str) -> float:
    # VmHWM, the peak RSS of this process image: ru_maxrss would carry the spawning benchmark's own across exec.
    code = f"{statement}\nprint(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    _, out, code_ = run_in(tree, python, ["-c", code])
    if code_ != 0:
        raise RuntimeError(f"{python} -c {statement!r} failed in {tree}")
    return int(out.split()[-1]) / 1024


def torch_version(python: str) -> str:
    _, out, _ = run_in(ROOT, python, ["-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"])
    return out.strip()


def measure(trees: dict[str, Path], pythons: list[str], rounds: int) -> list[dict]:
    samples: dict[tuple, list] = {}
    for _ in range(rounds):
        for python in pythons:
            for label, tree in trees.items():
                for name, statement in IMPORTS.items():
                    samples.setdefault((python, label, "rss", name), []).append(import_rss_mib(tree, python, statement))
                for command in HELP_COMMANDS if python == pythons[0] else ():
                    seconds, _, code = run_in(tree, python, [command, "--help"])
                    samples.setdefault((python, label, "help", command), []).append((seconds, code))
    rows = []
    for (python, label, kind, name), values in samples.items():
        row = {"python": python, "tree": label, "kind": kind, "what": name}
        if kind == "rss":
            row["value"] = statistics.median(values)
        else:
            row["value"] = statistics.median(seconds for seconds, _ in values)
            row["exit_codes"] = sorted({code for _, code in values})
        rows.append(row)
    return rows


def render(rows: list[dict], trees: dict[str, Path], versions: dict[str, str], info: dict, args) -> str:
    labels = list(trees)
    md = ["# Start-up cost: memory after imports, time of --help", ""]
    md += common.machine_lines(info)
    md += ["- trees: " + ", ".join(f"{label} = `{tree}`" for label, tree in trees.items()),
           f"- medians of {args.rounds} interleaved rounds, each measurement a fresh process", ""]
    for python, version in versions.items():
        md += [f"## `{python}` (torch, transformers: {version})", ""]
        table = []
        for kind, what in dict.fromkeys((r["kind"], r["what"]) for r in rows if r["python"] == python):
            cells = {r["tree"]: r for r in rows if r["python"] == python and r["kind"] == kind and r["what"] == what}
            unit = "MiB" if kind == "rss" else "s"
            name = f"RSS after `{IMPORTS[what]}`" if kind == "rss" else f"`python {what} --help`"
            values = []
            for label in labels:
                cell = cells[label]
                text = f"{cell['value']:.0f} {unit}" if kind == "rss" else f"{cell['value']:.2f} {unit}"
                if kind == "help" and cell["exit_codes"] != [0]:
                    text += f" (exit {','.join(map(str, cell['exit_codes']))})"
                values.append(text)
            if len(labels) == 2:
                before, after = (cells[label]["value"] for label in labels)
                values.append(f"{before / after:.2f}x")
            table.append([name, *values])
        headers = ["measurement", *labels] + (["before / after"] if len(labels) == 2 else [])
        md += [common.markdown_table(headers, table), ""]
        current = {(r["kind"], r["what"]): r["value"] for r in rows if r["python"] == python and r["tree"] == labels[-1]}
        rss = current[("rss", "import modeling_vikdf, processing_vikdf")]
        floor = current[("rss", "+ transformers.modeling_utils")]
        md.append(f"- RSS after `import modeling_vikdf, processing_vikdf`: {rss:.0f} MiB (target ≤ {RSS_TARGET_MIB}: "
                  f"{'met' if rss <= RSS_TARGET_MIB else 'NOT met'}); {rss - floor:.0f} MiB of it is ours, the rest "
                  "is torch and transformers' `modeling_utils`.")
        help_s = current.get(("help", "train_pretrain.py"))
        if help_s is not None:
            md.append(f"- `python train_pretrain.py --help`: {help_s:.2f} s (target < {HELP_TARGET_S:g} s: "
                      f"{'met' if help_s < HELP_TARGET_S else 'NOT met'}).")
        md.append("")
    return "\n".join(md)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="a git commit to measure next to this checkout")
    parser.add_argument("--pythons", nargs="+", default=[sys.executable], help="interpreters to measure with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    parser.add_argument("--tag", default=None, help="suffix of the result file names")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    info = common.machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="vikdf-before-") as scratch:
        trees = {}
        if args.before:
            before = Path(scratch) / "tree"
            subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                           capture_output=True)
            trees[f"before ({args.before})"] = before
        trees["after (this checkout)"] = ROOT
        try:
            versions = {python: torch_version(python) for python in args.pythons}
            rows = measure(trees, args.pythons, args.rounds)
        finally:
            if args.before:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    markdown = render(rows, trees, versions, info, args)
    print(markdown)
    payload = {"machine": info, "args": vars(args), "versions": versions, "rows": rows,
               "trees": {label: str(tree) for label, tree in trees.items()}}
    md_path, json_path = common.write_results("startup_cpu" + (f"_{args.tag}" if args.tag else ""), markdown, payload,
                                              args.output_dir)
    print(f"wrote {md_path} and {json_path}")
    return payload


if __name__ == "__main__":
    main()
