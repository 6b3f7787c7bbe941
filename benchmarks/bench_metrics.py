"""Time the dialogue metrics, cold, warm and stage by stage, on 20,000 synthetic pairs with a synthetic GloVe file of
glove.6B.300d.txt's shape (400k words × 300 floats, ~1 GB, whose one full pass dominates a cold call)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import _bench_common as common  # puts the repository root on sys.path
import numpy as np

from vikdf.evaluation import dialogue_metrics as dm

DIM = 300


def write_glove(path: Path, vocab_size: int, rng: np.random.Generator) -> None:
    """`vocab_size` lines `word v1 … v300`; 1,000 distinct vectors are reused to keep it quick."""
    rows = [" ".join(f"{x:.5f}" for x in vec) for vec in rng.normal(scale=0.4, size=(1000, DIM))]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"w{i} {rows[i % len(rows)]}\n" for i in range(vocab_size))


def make_pairs(n: int, vocab_size: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """References of 5–25 Zipf-drawn words (2 % unknown) and a stop, hypotheses sharing about half, as replies do."""
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


def main() -> None:
    parser = common.argument_parser(__doc__, sizes=None)
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--vocab-size", type=int, default=400_000, help="glove.6B has 400,000 words")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        glove = Path(tmp) / f"synthetic.{DIM}d.txt"
        _, write_s = common.timed(write_glove, glove, args.vocab_size, rng)
        predictions, references = make_pairs(args.pairs, args.vocab_size, rng)
        dm._GLOVE_CACHE.clear()  # cold: an empty GloVe cache, as in a fresh evaluation process
        scores, cold_s = common.timed(dm.compute_dialogue_metrics, predictions, references, glove_path=glove)
        _, warm_s = common.timed(dm.compute_dialogue_metrics, predictions, references, glove_path=glove)
        dm._GLOVE_CACHE.clear()  # then each stage on its own
        _, scan_s = common.timed(dm.load_glove, glove)
        (hyps, refs), tokenise_s = common.timed(lambda: ([dm.tokenize(p) for p in predictions],
                                                         [dm.tokenize(r) for r in references]))
        seconds = {
            "compute_dialogue_metrics, cold (GloVe file not yet scanned)": cold_s,
            "compute_dialogue_metrics, warm (GloVe cached)": warm_s,
            "tokenise (NLTK Treebank)": tokenise_s,
            "BLEU-1 (pycocoevalcap)": common.timed(dm.bleu_1, hyps, refs)[1],
            "ROUGE-L (pycocoevalcap)": common.timed(dm.rouge_l, hyps, refs)[1],
            "GloVe scan (first use of a file)": scan_s,
            "Average + Extrema + Greedy (file scanned)": common.timed(dm.embedding_metrics, hyps, refs, glove)[1],
            "Distinct-1/2": common.timed(lambda: (dm.distinct_n(predictions, 1), dm.distinct_n(predictions, 2)))[1],
        }
        size_mb = glove.stat().st_size / 2**20

    common.publish("metrics_cpu", "Dialogue metrics on CPU", [
        f"- data: {args.pairs:,} synthetic pairs; synthetic GloVe file {args.vocab_size:,} words × {DIM} "
        f"({size_mb:,.0f} MB, written in {write_s:.1f} s, not counted); numpy {np.__version__}", "",
        common.markdown_table(["stage", "seconds"], [[name, f"{s:.2f}"] for name, s in seconds.items()]), "",
        "Scores (×100, sanity check): " + ", ".join(f"{k} {common.fmt(v)}" for k, v in scores.items())],
        {"args": vars(args), "seconds": seconds, "scores": scores}, args.output_dir)


if __name__ == "__main__":
    main()
