"""What the benchmarks share: flags, device, GPU peaks, model configs, random-weight and tiny models, peak memory,
interleaved timing rounds and result files. Nothing here changes the model; it only builds and measures it."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vikdf.training import arguments  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peaks with fp32 accumulation (data sheets, no 2:4 sparsity), TFLOP/s, matched in this order
# against the GPU's name. RTX 4090: the Ada whitepaper's; its 330 is fp16 with fp16 accumulate, unused for bf16.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIE", 756.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05), ("RTX 4090", 165.2))


def argument_parser(docstring: str, sizes: tuple[str, ...] | None = ("tiny", "paper")) -> argparse.ArgumentParser:
    """A parser with `--output_dir` and, unless `sizes` is None, the flags every model benchmark takes."""
    parser = argparse.ArgumentParser(description=docstring.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    if sizes is not None:
        parser.add_argument("--size", choices=sizes, default="tiny")
        parser.add_argument("--llm_layers", type=int, default=None, help="cut the LLM to this many layers (CPU)")
        parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
        parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per row (median reported)")
        parser.add_argument("--tag", default=None, help="suffix of the result file names (several runs on one device)")
    return parser


def setup(args) -> tuple[torch.device, torch.dtype]:
    """The GPU if there is one, else the CPU, and its dtype: bf16 on a GPU (where supported), fp32 on the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device, arguments.resolve_dtype("auto")


def result_stem(name: str, args, device: torch.device) -> tuple[str, str]:
    """(file stem, size label) of a model benchmark's results: `<name>_<cpu|h200|rtx4090|...>_<size>[-llmNL][_tag]`."""
    gpu = torch.cuda.get_device_name(device).upper() if device.type == "cuda" else ""
    slug = next((p.lower().replace(" ", "") for p in ("H200", "H100", "A100", "L40S", "RTX 4090") if p in gpu), "gpu")
    label = args.size + (f"-llm{args.llm_layers}L" if args.llm_layers else "")
    return f"{name}_{slug if gpu else 'cpu'}_{label}" + (f"_{args.tag}" if args.tag else ""), label


def peak_tflops(device: torch.device, dtype: torch.dtype, given: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s for MFU, its source): `given` (--peak_tflops), else the table's; None on CPU and off the table."""
    if given:
        return given, "--peak_tflops"
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None, "n/a (pass --peak_tflops to get an MFU)"
    name = torch.cuda.get_device_name(device).upper()
    found = next(((p, t) for p, t in PEAK_BF16_TFLOPS if p in name), None)
    return (found[1], f"{found[0]} dense bf16 spec") if found else (None, f"unknown GPU {name!r} (pass --peak_tflops)")


def model_config(size: str, llm_layers: int | None = None, **overrides):
    """A `VIKDFConfig`: tiny, `vikdf.testing`'s; medium, every tower 256 wide and 4 deep, CLIP at 112 px, Llama-2's
    vocabulary (the LM head's share of a step as at paper size); paper, `VIKDFConfig()`. `llm_layers` cuts the LLM."""
    from transformers import BertConfig, CLIPConfig

    from configuration_vikdf import LLAMA_2_7B, VIKDFConfig
    from vikdf.testing import tiny_llm_config, tiny_vikdf_config
    from vikdf.training.components import iq_former_config_from_bert

    # Beyond tiny, Llama-2's shapes and vocabulary + `<knowledge>`, id 32000.
    text = tiny_llm_config().to_dict() if size == "tiny" else {**LLAMA_2_7B, "vocab_size": 32001, "pad_token_id": 0}
    settings = {"knowledge_token_id": 32000}
    if size == "medium":
        tower = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
        text.update(tower, intermediate_size=688, num_key_value_heads=4)
        clip = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                          vision_config=dict(tower, image_size=112, patch_size=14), projection_dim=256)
        settings.update(clip_config=clip.to_dict(), head_num_attention_heads=4, head_intermediate_size=1024,
                        qformer_config=iq_former_config_from_bert(BertConfig(**tower), 256).to_dict())
    text["num_hidden_layers"] = llm_layers or text["num_hidden_layers"]
    if size == "tiny":
        return tiny_vikdf_config(text_config=text, **overrides)
    return VIKDFConfig(text_config=text, **{**settings, **overrides})


def build_random_model(model_class, config, device: torch.device, dtype: torch.dtype):
    """`model_class(config)` with random weights, built on `device` (a 7B model never materialises on the host), in
    the layout `from_pretrained(dtype=bf16)` gives: `_keep_in_fp32_modules` in fp32, which `_from_config` casts."""
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, parameter in model.named_parameters():
        if name.split(".")[0] in fp32:
            parameter.data = parameter.data.float()
    return model


def tiny_vikdf(components, **overrides):
    """(model, processor) built from `vikdf.testing`'s tiny component folders, as from hub ids."""
    from vikdf.testing import TINY_HEADS
    from vikdf.training.components import build_vikdf_from_components

    return build_vikdf_from_components(str(components.clip), str(components.bert), str(components.llm),
                                       **{"num_query_tokens": 8, **TINY_HEADS, **overrides})


@contextlib.contextmanager
def tiny_workspace(num_pairs: int = 0, **world_options):
    """(scratch folder, tiny llama components, a synthetic world of `num_pairs` pairs or None), removed after."""
    from vikdf.demo.world import write_synthetic_world
    from vikdf.testing import write_tiny_components

    with tempfile.TemporaryDirectory(prefix="vikdf-bench-") as scratch:
        work, options = Path(scratch), {"num_shards": 1, "num_heldout_pairs": 4, "num_dialogues": 4, **world_options}
        components = write_tiny_components(work / "components", "llama")
        world = write_synthetic_world(work / "world", num_pairs=num_pairs, **options) if num_pairs else None
        yield work, components, world


def cli(**options) -> list[str]:
    """Command-line tokens `--name value` of `options`."""
    return [token for name, value in options.items() for token in (f"--{name}", str(value))]


def timed(function, *args, **kwargs) -> tuple[object, float]:
    """(what `function(*args, **kwargs)` returns, its wall seconds)."""
    start = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA kernels run asynchronously: a timer must wait for them
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bf16_weight_bytes(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Bytes of the weights as `from_pretrained(dtype=bf16)` holds them (`_keep_in_fp32_modules` in fp32)."""
    fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    return sum(p.numel() * (4 if name.split(".")[0] in fp32 else 2) for name, p in model.named_parameters()
               if p.requires_grad or not trainable_only)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks "
                                              "keepcost".split()]


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_LIBC.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    """glibc's bytes in use (`mallinfo2`: small blocks + mmapped blocks), where every CPU tensor lives. Unlike RSS it
    goes down when memory is freed, so a peak over a block is that block's."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory:
    """Peak memory over a block (`peak_gib`): CUDA's max allocated, or the glibc heap every 2 ms and at `poll()`."""

    def __init__(self, device: torch.device):
        self.device, self.cuda, self.peak_bytes, self._stop = device, device.type == "cuda", 0, threading.Event()
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "glibc heap in use (mallinfo2), every 2 ms"

    def __enter__(self):
        synchronize(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = heap_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def poll(self, *_) -> None:
        if not self.cuda:
            self.peak_bytes = max(self.peak_bytes, heap_bytes())

    def _sample(self):
        while not self._stop.wait(0.002):
            self.poll()

    def __exit__(self, *exc):
        synchronize(self.device)
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.poll()
        self.peak_gib = self.peak_bytes / 2**30


def guarded(measure, device: torch.device) -> dict:
    """`measure()`, an error (an OOM at a large batch, a failed compile) as {"error": ...}, not the run's end."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - one row must not end the run
        free_memory(device)
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
            return {"error": "OOM"}
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}


def interleaved(measurements: list, rounds: int, device: torch.device) -> list[list[dict]]:
    """Each measurement `rounds` times, round-robin (A B A B ...), so that a slow phase of a shared machine hits
    every variant alike; per measurement its rounds' results, stopping at its first error."""
    raw = [[] for _ in measurements]
    for _ in range(rounds):
        for runs, measure in zip(raw, measurements):
            if not (runs and "error" in runs[-1]):
                runs.append(guarded(measure, device))
    return raw


def medians(runs: list[dict], *keys: str) -> dict:
    """Per key the median of the rounds' values, and the largest "peak_gib"; or the first error."""
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0]}
    return {**{key: statistics.median(v for r in runs for v in r[key]) for key in keys},
            "peak_gib": max(v for r in runs for v in r["peak_gib"])}


def machine_info(device: torch.device) -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu, "device_type": device.type,
        # Float results on the CPU depend on which vector kernels ATen picks (AVX2 or AVX512).
        "host": f"{cpu} ({torch.backends.cpu.get_cpu_capability()} kernels), {os.cpu_count()} cores, torch threads "
                f"{torch.get_num_threads()}; {platform.platform()}",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, transformers "
                    f"{transformers.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    marks = ["---:" if a == "r" else "---" for a in (align or "l" + "r" * (len(headers) - 1))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    return "\n".join(lines + ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows])


def machine_lines(info: dict) -> list[str]:
    return [f"- command: `{info['command']}`", f"- date: {info['date']}", f"- device: **{info['device']}**",
            f"- host: {info['host']}", f"- {info['versions']}"]


def write_results(stem: str, markdown: str, payload: dict, output_dir=None) -> tuple[Path, Path]:
    directory = Path(output_dir) if output_dir else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return md_path, json_path


def publish(stem: str, title: str, lines: list[str], payload: dict, output_dir=None, device=None) -> str:
    """`results/<stem>.{md,json}`: the title, the machine and command, then `lines`; the JSON adds the machine."""
    info = machine_info(device or torch.device("cpu"))
    markdown = "\n".join([f"# {title}", "", *machine_lines(info), "", *lines, ""])
    paths = write_results(stem, markdown, {"machine": info, **payload}, output_dir)
    print(markdown + f"\nwrote {paths[0]} and {paths[1]}")
    return markdown


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else value if isinstance(value, str) else f"{value:,.{digits}f}"
