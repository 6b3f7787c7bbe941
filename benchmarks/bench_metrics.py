"""Time the dialogue metrics on 20,000 synthetic pairs with a GloVe-sized 300d file.

    python benchmarks/bench_metrics.py [--pairs 20000] [--vocab-size 400000]

The GloVe file is synthetic but has the shape of glove.6B.300d.txt (400k words × 300 floats, ~1 GB), because
the one full pass over it (for the OOV mean vector) dominates a cold call. Sentences draw words with a Zipf
law from the file's vocabulary, plus a few out-of-vocabulary words and punctuation, so tokenisation, BLEU,
ROUGE and all three embedding metrics do realistic work. Writes ``benchmarks/results/metrics_cpu.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vikdf.evaluation import dialogue_metrics as dm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "metrics_cpu.md"


def write_glove(path: Path, vocab_size: int, dim: int, rng: np.random.Generator) -> None:
    """Write ``vocab_size`` lines ``word v1 … v_dim``; 1,000 distinct vectors are reused to keep it quick."""
    rows = [" ".join(f"{x:.5f}" for x in vec) for vec in rng.normal(scale=0.4, size=(1000, dim))]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(vocab_size):
            f.write(f"w{i} {rows[i % len(rows)]}\n")


def make_pairs(n: int, vocab_size: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """References of 5–25 tokens and hypotheses sharing about half their words, as generated replies do."""
    def sentence(length: int) -> list[str]:
        ids = np.minimum(rng.zipf(1.3, size=length), vocab_size) - 1
        words = [f"w{i}" if rng.random() > 0.02 else f"oov{i}" for i in ids]
        return words + [str(rng.choice([".", "?", "!"]))]

    predictions, references = [], []
    for _ in range(n):
        ref = sentence(int(rng.integers(5, 26)))
        hyp = [w for w in ref if rng.random() < 0.5] + sentence(int(rng.integers(0, 10)))
        predictions.append(" ".join(hyp).capitalize())
        references.append(" ".join(ref))
    return predictions, references


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--vocab-size", type=int, default=400_000, help="glove.6B has 400,000 words")
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        glove_path = Path(tmp) / f"synthetic.{args.dim}d.txt"
        _, write_s = timed(write_glove, glove_path, args.vocab_size, args.dim, rng)
        size_mb = glove_path.stat().st_size / 2**20
        predictions, references = make_pairs(args.pairs, args.vocab_size, rng)

        # Cold: an empty GloVe cache, as in a fresh evaluation process.
        dm._GLOVE_CACHE.clear()
        result, cold_s = timed(dm.compute_dialogue_metrics, predictions, references, glove_path=glove_path)
        # Warm: the same call again, then each stage on its own.
        _, warm_s = timed(dm.compute_dialogue_metrics, predictions, references, glove_path=glove_path)
        dm._GLOVE_CACHE.clear()
        _, scan_s = timed(dm.load_glove, glove_path)
        hyps, tok_hyp_s = timed(lambda: [dm.tokenize(p) for p in predictions])
        refs, tok_ref_s = timed(lambda: [dm.tokenize(r) for r in references])
        stages = {
            "tokenise (NLTK Treebank)": tok_hyp_s + tok_ref_s,
            "BLEU-1 (pycocoevalcap)": timed(dm.bleu_1, hyps, refs)[1],
            "ROUGE-L (pycocoevalcap)": timed(dm.rouge_l, hyps, refs)[1],
            "GloVe scan (first use of a file)": scan_s,
            "Average + Extrema + Greedy (file scanned)": timed(dm.embedding_metrics, hyps, refs, glove_path)[1],
            "Distinct-1/2": timed(lambda: (dm.distinct_n(predictions, 1), dm.distinct_n(predictions, 2)))[1],
        }

    lines = [
        "# Dialogue metrics on CPU",
        "",
        f"`python benchmarks/bench_metrics.py --pairs {args.pairs} --vocab-size {args.vocab_size} --dim {args.dim}`",
        "",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}",
        f"- data: {args.pairs:,} synthetic pairs; synthetic GloVe file {args.vocab_size:,} words × {args.dim} "
        f"({size_mb:,.0f} MB, written in {write_s:.1f} s, not counted)",
        "",
        "| stage | seconds |",
        "| --- | ---: |",
        f"| **compute_dialogue_metrics, cold (GloVe file not yet scanned)** | **{cold_s:.2f}** |",
        f"| compute_dialogue_metrics, warm (GloVe cached) | {warm_s:.2f} |",
        *(f"| {name} | {seconds:.2f} |" for name, seconds in stages.items()),
        "",
        "Scores (×100; synthetic text, only a sanity check): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report, encoding="utf-8")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
