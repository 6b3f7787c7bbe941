"""Real two-process DeepSpeed ZeRO-2 pre-training runs on CPU, launched the three documented ways:

    accelerate launch --config_file ds_configs/accelerate_zero2.yaml --num_processes 2 train_pretrain.py ...
    accelerate launch ... --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1 ...   (two "nodes")
    deepspeed --num_gpus 2 train_pretrain.py --deepspeed ds_configs/zero2.json ...

The first is the reference (and writes TensorBoard events); the other two must train exactly as it does, and so must
a run resumed from its trainable-only checkpoint-3 (`vikdf.training.trainable_checkpoints`), launched after it.

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
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from pretrain_helpers import free_port, pretrain_argv

from vikdf.data.pairs import MixedPairDataset, SkipCounter, WebDatasetSource
from vikdf.training.frozen_parts import FROZEN_PARTS_NAME
from vikdf.data.stream_state import load_stream_state
from vikdf.training.trainable_checkpoints import TRAINABLE_WEIGHTS_NAME
from vikdf.training.trainers import OBJECTIVES, stream_state_name

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
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
        for _ in MixedPairDataset([source], seed=seed, infinite=False, rank=1, world_size=2, skips=skips):
            pass
        if skips.counts["unreadable_image"]:
            return seed
    raise AssertionError("no seed gives the corrupt shard to rank 1")


@dataclass(frozen=True)
class Run:
    returncode: int
    log: str
    output_dir: Path


@pytest.fixture(scope="module")
def launch_world(tiny_components, pair_world, tmp_path_factory):
    """What every launch below shares: the shards (with the corrupt one), and a `train_pretrain.py` argv builder."""
    root = tmp_path_factory.mktemp("deepspeed")
    extra = root / "extra"
    extra.mkdir()
    _write_extra_shard(extra / "00000.tar")
    patterns = f"{pair_world.train_shards}::{extra / '00000.tar'}"
    seed = _seed_giving_the_corrupt_shard_to_rank_1(patterns)

    def argv(output_dir: Path, **options) -> list[str]:
        return pretrain_argv(
            tiny_components("llama"), "wds:" + patterns, output_dir,
            max_steps=STEPS, logging_steps=2, save_steps=STEPS // 2, seed=seed, ddp_backend="gloo", learning_rate=1e-3,
            **options,
        )

    return root, argv


def _launch_together(jobs: dict[str, tuple[list[list[str]], Path]], root: Path) -> dict[str, Run]:
    """Start every process of every job (name -> (commands, output_dir)) at once and wait for all. The jobs are
    independent, and much of a launch is start-up, which overlaps; each job's logs end up in one string."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = {}
    for name, (commands, _) in jobs.items():
        for i, command in enumerate(commands):
            log = root / f"{name}-{i}.log"
            with open(log, "w") as handle:
                process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
            started.setdefault(name, []).append((process, log))
    try:
        returncodes = {name: [process.wait(timeout=840) for process, _ in runs] for name, runs in started.items()}
    finally:
        for runs in started.values():
            for process, _ in runs:
                if process.poll() is None:
                    process.kill()
    return {
        name: Run(
            max(returncodes[name], key=abs), "\n".join(log.read_text() for _, log in started[name]), jobs[name][1]
        )
        for name in jobs
    }


def _accelerate(machine_rank: int, num_machines: int, port: int, argv: list[str]) -> list[str]:
    """The README's command, one node of `num_machines` (2 processes in all)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", "ds_configs/accelerate_zero2.yaml",
        "--num_processes", "2", "--num_machines", str(num_machines), "--machine_rank", str(machine_rank),
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "train_pretrain.py", *argv,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(launch_world) -> dict[str, Run]:
    """The same training launched three ways, all at once:

    - "single-node": one node, two processes, TensorBoard logging on (the reference);
    - "two-nodes": two `accelerate launch` processes as two nodes of one process each, meeting at 127.0.0.1;
    - "deepspeed-launcher": the README's other form, `deepspeed train_pretrain.py --deepspeed ds_configs/zero2.json`;
    - "4bit-llm": the single-node launch with the frozen LLM in 4-bit (`vikdf.training.quantization`).
    """
    root, argv = launch_world
    outputs = {name: root / name for name in ("single-node", "two-nodes", "deepspeed-launcher", "4bit-llm")}
    two_node_port = free_port()
    deepspeed_command = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
        "train_pretrain.py", "--deepspeed", "ds_configs/zero2.json", *argv(outputs["deepspeed-launcher"]),
    ]  # fmt: skip
    jobs = {
        "single-node": (
            [_accelerate(0, 1, free_port(), argv(outputs["single-node"], report_to="tensorboard"))],
            outputs["single-node"],
        ),
        "two-nodes": (
            [_accelerate(rank, 2, two_node_port, argv(outputs["two-nodes"])) for rank in (0, 1)],
            outputs["two-nodes"],
        ),
        "deepspeed-launcher": ([deepspeed_command], outputs["deepspeed-launcher"]),
        "4bit-llm": (
            [_accelerate(0, 1, free_port(), [*argv(outputs["4bit-llm"]), "--llm_quantization", "4bit"])],
            outputs["4bit-llm"],
        ),
    }
    return _launch_together(jobs, root)


@pytest.fixture(scope="module")
def deepspeed_run(runs) -> Run:
    return runs["single-node"]


@pytest.fixture(scope="module")
def two_node_run(runs) -> Run:
    return runs["two-nodes"]


@pytest.fixture(scope="module")
def deepspeed_launcher_run(runs) -> Run:
    return runs["deepspeed-launcher"]


@pytest.mark.timeout(900)
def test_two_process_zero2_run_trains_logs_skips_and_saves(deepspeed_run):
    returncode, log, output_dir = deepspeed_run.returncode, deepspeed_run.log, deepspeed_run.output_dir
    assert returncode == 0, log[-6000:]

    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in checkpoints] == [f"checkpoint-{STEPS // 2}", f"checkpoint-{STEPS}"]
    # Two processes saved their RNG state, and DeepSpeed (not DDP) wrote its sharded ZeRO state.
    final = checkpoints[-1]
    assert (final / "rng_state_0.pth").is_file() and (final / "rng_state_1.pth").is_file()
    assert (final / f"global_step{STEPS}").is_dir() and (final / "zero_to_fp32.py").is_file()
    # It holds what trains (vikdf.training.trainable_checkpoints): DeepSpeed's module file leaves the frozen parts out
    # too.
    assert (final / TRAINABLE_WEIGHTS_NAME).is_file() and (final / FROZEN_PARTS_NAME).is_file()
    assert not (final / "model.safetensors").exists()
    # DeepSpeed's module file is a pickle, so it is not loaded here: the tensor bytes its archive stores are those of
    # the trainable parameters (and a few small buffers), far below the whole model's.
    with zipfile.ZipFile(final / f"global_step{STEPS}" / "mp_rank_00_model_states.pt") as archive:
        stored = sum(entry.file_size for entry in archive.infolist() if "/data/" in entry.filename)
    trainable = sum(t.numel() * t.element_size() for t in load_file(final / TRAINABLE_WEIGHTS_NAME).values())
    assert trainable <= stored <= trainable + 64 * 1024, (stored, trainable)
    assert stored < 0.75 * (output_dir / "model.safetensors").stat().st_size

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
def test_final_model_loads_as_remote_code_in_a_fresh_process(deepspeed_run, tmp_path):
    returncode, log, output_dir = deepspeed_run.returncode, deepspeed_run.log, deepspeed_run.output_dir
    assert returncode == 0, log[-3000:]
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
    result = subprocess.run(
        [sys.executable, "-c", script, str(output_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env=env,
    )
    assert result.returncode == 0 and "LOADED" in result.stdout, result.stdout + result.stderr[-4000:]


def _logged_objectives(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    keys = ("step", "loss", "skipped_pairs", *(f"loss_{name}" for name in OBJECTIVES))
    return [{key: entry[key] for key in keys} for entry in state["log_history"] if "loss" in entry]


def _assert_same_training(run: Run, reference: Run, logged_after: int = 0) -> None:
    """Same logged per-objective losses and skip counts (of the steps after `logged_after`), same final weights,
    same per-rank stream positions."""
    assert run.returncode == 0, run.log[-6000:]
    assert reference.returncode == 0, reference.log[-3000:]
    logged = [[e for e in _logged_objectives(r.output_dir) if e["step"] > logged_after] for r in (run, reference)]
    assert logged[0] and logged[0] == logged[1]
    weights, expected = (load_file(d / "model.safetensors") for d in (run.output_dir, reference.output_dir))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    for rank in (0, 1):
        # Each rank read its own share: reader `rank` of 2 (1 DataLoader worker each), at the reference's position.
        states = [
            load_stream_state(d / f"checkpoint-{STEPS}" / stream_state_name(rank))
            for d in (run.output_dir, reference.output_dir)
        ]
        assert states[0] == states[1]
        dataset_state = states[0]["dataset_state"]
        assert (dataset_state["reader"], dataset_state["readers"]) == (rank, 2)


@pytest.mark.timeout(900)
def test_two_nodes_train_exactly_as_one_node(two_node_run, deepspeed_run):
    """`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`, one process per node: the same run as
    two processes on one node."""
    _assert_same_training(two_node_run, deepspeed_run)


@pytest.mark.timeout(900)
def test_deepspeed_launcher_trains_exactly_as_accelerate(deepspeed_launcher_run, deepspeed_run):
    _assert_same_training(deepspeed_launcher_run, deepspeed_run)


@pytest.fixture(scope="module")
def resumed_run(launch_world, deepspeed_run) -> Run:
    """Two processes resumed from the reference run's checkpoint-3 (trainable parameters, DeepSpeed's module file
    without the frozen parts) into a folder of their own, to the same last step."""
    root, argv = launch_world
    output_dir = root / "resumed"
    checkpoint = deepspeed_run.output_dir / f"checkpoint-{STEPS // 2}"
    command = _accelerate(0, 1, free_port(), argv(output_dir, resume_from_checkpoint=checkpoint))
    return _launch_together({"resumed": ([command], output_dir)}, root)["resumed"]


@pytest.mark.timeout(900)
def test_a_run_resumed_from_a_trainable_checkpoint_trains_exactly_as_the_uninterrupted_one(resumed_run, deepspeed_run):
    """The frozen parts rebuilt from their sources match the checkpoint's fingerprints; DeepSpeed loads the module
    without them, and the run ends with the uninterrupted run's weights, logs and stream positions."""
    # The values logged at step 4 average steps 3 and 4, of which the resumed run ran step 4 alone.
    _assert_same_training(resumed_run, deepspeed_run, logged_after=STEPS // 2 + 1)


@pytest.mark.timeout(900)
def test_zero2_trains_with_a_4bit_llm(runs, deepspeed_run):
    """ZeRO-2 partitions the trained parts' gradients and optimizer state; the 4-bit LLM stays whole on each rank."""
    run = runs["4bit-llm"]
    assert run.returncode == 0, run.log[-6000:]
    config = json.loads((run.output_dir / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    first = [json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"][0]
             for out in (run.output_dir, deepspeed_run.output_dir)]
    for name in OBJECTIVES:  # the same batches, and the LLM's rounding moves the losses by little
        assert math.isfinite(first[0][f"loss_{name}"])
        assert first[0][f"loss_{name}"] == pytest.approx(first[1][f"loss_{name}"], rel=0.05), name


def test_tensorboard_events_hold_the_objectives_and_skip_counts(deepspeed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert deepspeed_run.returncode == 0, deepspeed_run.log[-3000:]
    (events,) = deepspeed_run.output_dir.glob("runs/*/events.out.tfevents.*")  # rank 0 alone writes
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = {entry["step"]: entry for entry in _logged_objectives(deepspeed_run.output_dir)}
    for key in ("loss", "skipped_pairs", "skipped_unreadable_image", *(f"loss_{name}" for name in OBJECTIVES)):
        scalars = accumulator.Scalars(f"train/{key}")
        # Skip counts also go into the end-of-training summary, logged at the last step once more.
        assert sorted({event.step for event in scalars}) == list(logged), key
        if key in logged[STEPS]:
            assert scalars[-1].value == pytest.approx(logged[STEPS][key], rel=1e-6), key
    assert accumulator.Scalars("train/skipped_unreadable_image")[-1].value >= 1
