"""A real two-process DeepSpeed ZeRO-2 pre-training run on CPU, launched the documented way:

    accelerate launch --config_file ds_configs/accelerate_zero2.yaml --num_processes 2 train_pretrain.py ...

with DS_ACCELERATOR=cpu, fp32 and the gloo backend (`--ddp_backend gloo`: without it accelerate finds no backend
on a CPU-only machine and reports one process although DeepSpeed started two). Data are real webdataset shards
plus one shard holding a corrupt JPEG, which the readers must skip and count. The first run on a machine also
JIT-builds DeepSpeed's CPU shared-memory communication op (about a minute), hence the generous timeout.
"""

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from pretrain_helpers import free_port, pretrain_argv

from vikdf.data.pairs import Partition, SkipCounter, WebDatasetSource

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
CORRUPT_KEY = "000000003"


def _write_extra_shard(path: Path) -> None:
    """Six real JPEG pairs and, among them, one member whose .jpg holds random bytes (with its caption)."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]
    with tarfile.open(path, "w") as tar:
        for index in range(7):
            key = f"{index:09d}"
            if key == CORRUPT_KEY:
                image_bytes = os.urandom(600)
                caption = "this picture is broken"
            else:
                buffer = io.BytesIO()
                Image.new("RGB", (32, 32), colours[index % len(colours)]).save(buffer, "JPEG", quality=95)
                image_bytes = buffer.getvalue()
                caption = f"a plain square number {index}"
            for name, data in ((f"{key}.jpg", image_bytes), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _seed_giving_the_corrupt_shard_to_rank_1(patterns: str) -> int:
    """A seed for which rank 1 of 2 reads the corrupt member, so that the count logged by rank 0 must come from
    summing over ranks (the pair stream gives each rank whole shards, chosen by the seed)."""
    source = WebDatasetSource(patterns)
    for seed in range(100):
        skips = SkipCounter(warn_first=0)
        for _ in source.examples(Partition(index=1, count=2), seed, 0, skips):
            pass
        if skips.counts["unreadable_image"]:
            return seed
    raise AssertionError("no seed gives the corrupt shard to rank 1")


@pytest.fixture(scope="module")
def deepspeed_run(tiny_components, pair_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    extra = root / "extra"
    extra.mkdir()
    _write_extra_shard(extra / "00000.tar")
    patterns = f"{pair_world.train_shards}::{extra / '00000.tar'}"
    seed = _seed_giving_the_corrupt_shard_to_rank_1(patterns)

    output_dir = root / "out"
    argv = pretrain_argv(
        tiny_components("llama"), "wds:" + patterns, output_dir,
        max_steps=STEPS, logging_steps=2, save_steps=6, seed=seed, ddp_backend="gloo", learning_rate=1e-3,
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "ds_configs/accelerate_zero2.yaml",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "train_pretrain.py", *argv,
    ]  # fmt: skip
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    log = result.stdout + result.stderr
    (root / "launch.log").write_text(log)
    return result.returncode, log, output_dir


@pytest.mark.timeout(900)
def test_two_process_zero2_run_trains_logs_skips_and_saves(deepspeed_run):
    returncode, log, output_dir = deepspeed_run
    assert returncode == 0, log[-6000:]

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == ["checkpoint-6", f"checkpoint-{STEPS}"]
    # Two processes saved their RNG state, and DeepSpeed (not DDP) wrote its sharded ZeRO state.
    final = checkpoints[-1]
    assert (final / "rng_state_0.pth").is_file() and (final / "rng_state_1.pth").is_file()
    assert (final / f"global_step{STEPS}").is_dir() and (final / "zero_to_fp32.py").is_file()

    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS
    history = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(history) == STEPS // 2
    for entry in history:
        for name in ("tim", "tamim", "iamtm", "iaci", "iakr"):
            assert math.isfinite(entry[f"loss_{name}"]), (entry["step"], name)
        assert math.isfinite(entry["loss"])

    # The corrupt JPEG, read by rank 1 only, is skipped (the run goes on) and counted in rank 0's logs.
    assert max(entry.get("skipped_unreadable_image", 0) for entry in history) >= 1
    assert CORRUPT_KEY in log and "unreadable_image" in log


@pytest.mark.timeout(900)  # may run the launch above when selected alone
def test_final_checkpoint_loads_as_remote_code_in_a_fresh_process(deepspeed_run, tmp_path):
    returncode, log, output_dir = deepspeed_run
    assert returncode == 0, log[-3000:]
    final = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    script = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModel
folder = sys.argv[1]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
saved = load_file(folder + "/model.safetensors")
assert type(model).__name__ == "VIKDFForConditionalGeneration", type(model)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
for name, tensor in model.state_dict().items():
    if name in saved:
        assert torch.equal(tensor, saved[name]), name
assert torch.equal(model.query_tokens, saved["query_tokens"])
print("LOADED", sum(p.numel() for p in model.parameters()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    for folder in (final, output_dir):
        result = subprocess.run(
            [sys.executable, "-c", script, str(folder)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
            env=env,
        )
        assert result.returncode == 0 and "LOADED" in result.stdout, result.stdout + result.stderr[-4000:]
