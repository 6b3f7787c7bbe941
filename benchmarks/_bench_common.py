"""What the benchmarks share: device and dtype, the GPU peaks for MFU, random-weight models, peak memory,
interleaved timing rounds and result files. Nothing here changes the model; it only builds and measures it."""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import threading
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

# Dense bf16 tensor-core peaks with fp32 accumulation (data sheets without 2:4 sparsity), TFLOP/s, matched in this
# order against the GPU's name. RTX 4090: the Ada whitepaper's "BF16 Tensor TFLOPS with FP32 Accumulate"; its 330
# is fp16 with fp16 accumulate, which PyTorch does not use for bf16.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIE", 756.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05), ("RTX 4090", 165.2))


def argument_parser(docstring: str, sizes: tuple[str, ...] = ("tiny", "paper")) -> argparse.ArgumentParser:
    """A parser described by the docstring's first paragraph, with the flags every model benchmark takes."""
    parser = argparse.ArgumentParser(description=docstring.split("\n\n")[0])
    parser.add_argument("--size", choices=sizes, default="tiny")
    parser.add_argument("--llm_family", choices=("llama", "qwen2", "mistral"), default="llama", help="tiny size only")
    parser.add_argument("--llm_layers", type=int, default=None, help="cut the LLM to this many layers (e.g. 2 on CPU)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attn_implementation", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per row (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    parser.add_argument("--tag", default=None, help="suffix of the result file names (several runs on one device)")
    return parser


def setup(args) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the flags ask for; "auto" dtype is fp32 on a GPU machine's CPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.float32 if args.dtype == "auto" and device.type != "cuda" else arguments.resolve_dtype(args.dtype)
    return device, dtype


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def device_slug(device: torch.device) -> str:
    """Short name for result files: cpu, h200, rtx4090, ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).upper()
    return next((p.lower().replace(" ", "") for p in ("H200", "H100", "A100", "L40S", "RTX 4090") if p in name), "gpu")


def default_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for MFU; None on CPU and outside the table."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None, "n/a (pass --peak_tflops to get an MFU)"
    name = torch.cuda.get_device_name(device).upper()
    found = next(((p, t) for p, t in PEAK_BF16_TFLOPS if p in name), None)
    return (found[1], f"{found[0]} dense bf16 spec") if found else (None, f"unknown GPU {name!r} (pass --peak_tflops)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_random_model(model_class, config, device: torch.device, dtype: torch.dtype, attn_implementation="sdpa"):
    """`model_class(config)` with random weights, built on `device` (a 7B model never materialises on the host), with
    `_keep_in_fp32_modules` in fp32: the layout `from_pretrained(dtype=bf16)` gives, which `_from_config` alone
    would cast too."""
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if dtype != torch.float32:
        for name in getattr(model, "_keep_in_fp32_modules", None) or []:
            part = getattr(model, name, None)
            if isinstance(part, torch.nn.Parameter):
                part.data = part.data.float()
            elif isinstance(part, torch.nn.Module):
                part.float()
    return model


def count_parameters(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _glibc_heap():
    """glibc's bytes in use (`mallinfo2`: small blocks + mmapped blocks), where every CPU tensor lives; None
    without glibc. Unlike RSS it goes down when memory is freed, so a peak over a block is that block's."""
    try:
        import ctypes
        import ctypes.util

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = MallInfo2
        libc.mallinfo2()
        return lambda: (lambda info: info.uordblks + info.hblkhd)(libc.mallinfo2())
    except (OSError, AttributeError, TypeError):
        return None


_HEAP_BYTES = _glibc_heap()


class PeakMemory:
    """Peak memory over a block: `torch.cuda.max_memory_allocated` on a GPU; on the CPU the glibc heap in use
    (RSS without glibc), sampled every 2 ms by a thread and at every `poll()`."""

    def __init__(self, device: torch.device):
        self.device, self.peak_bytes, self._stop, self._thread = device, 0, threading.Event(), None
        self._read = _HEAP_BYTES or rss_bytes
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                       "glibc heap in use (mallinfo2), sampled every 2 ms" if _HEAP_BYTES else "process RSS")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self._read()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def poll(self, *_) -> None:
        if self.device.type != "cuda":
            self.peak_bytes = max(self.peak_bytes, self._read())

    def _sample(self):
        while not self._stop.wait(0.002):
            self.poll()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.poll()
        return False

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


def guarded(measure, device: torch.device) -> dict:
    """`measure()`, with an error (an OOM at a large batch, a failed compile) as {"error": ...} instead of the end
    of the run."""
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


def median_of(runs: list[dict], key: str):
    """The median of `key` over runs without error, or the first error."""
    errors = [r["error"] for r in runs if "error" in r]
    return {"error": errors[0]} if errors else statistics.median(v for r in runs for v in r[key])


def machine_info(device: torch.device) -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "device_type": device.type,
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
