"""Helpers shared by `bench_pretrain_step.py` and `bench_generate.py`: device and dtype, peak FLOP/s per GPU,
model construction at bf16 with the fp32-kept modules, memory peaks, timing and result files.

Nothing here changes the model; it only builds and measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import shlex
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vikdf import arguments  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) bf16 tensor-core peaks with fp32 accumulation, from the vendors' data sheets, in TFLOP/s.
# Matched in this order against torch.cuda.get_device_name() (the first pattern found wins).
#   H200 SXM / H100 SXM: 989.4 (data sheet "1,979 TFLOPS" is with 2:4 sparsity). This project's device notes
#     measured about 790 TFLOP/s of bf16 matrix work on its H200; MFU here is against the spec number, 989.
#   H200 NVL / H100 NVL: 835.5 (1,671 with sparsity). H100 PCIe: 756.5 (1,513 with sparsity).
#   A100: 312. L40S: 362.05.
#   RTX 4090: 165.2 (Ada whitepaper: "Peak BF16 Tensor TFLOPS with FP32 Accumulate 165.2/330.4"; the 330.3 figure
#     is fp16 with fp16 accumulate, which PyTorch does not use for bf16, and 82.6 is TF32 / plain fp32).
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIE", 756.5),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("RTX 4090", 165.2),
)


# ------------------------------------------------------------------------------------------------ device and dtype


def argument_parser(docstring: str, llm_layers_help: str, sizes: tuple[str, ...] = ("tiny", "paper")) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the benchmark's `docstring`, with the flags every model benchmark
    takes: model size, device and dtype, threads, seed, result files."""
    parser = argparse.ArgumentParser(
        description=docstring.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sizes, default="tiny")
    parser.add_argument("--llm_family", choices=("llama", "qwen2", "mistral"), default="llama", help="tiny size only")
    parser.add_argument("--llm_layers", type=int, default=None, help=llm_layers_help)
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--attn_implementation", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    parser.add_argument("--tag", default=None, help="suffix of the result file names (several runs on one device)")
    return parser


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`vikdf.arguments.resolve_dtype` for the device the benchmark runs on: "auto" is fp32 on a GPU machine's CPU."""
    return torch.float32 if name == "auto" and device.type != "cuda" else arguments.resolve_dtype(name)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def device_label(device: torch.device) -> str:
    """Human name: the GPU's name or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """Short name for result files: cpu, h200, rtx4090, h100, a100, ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).upper()
    for pattern in ("H200", "H100", "A100", "L40S", "RTX 4090"):
        if pattern in name:
            return pattern.lower().replace(" ", "")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def default_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it comes from) for MFU; None on CPU or for dtypes without a table entry."""
    if device.type != "cuda":
        return None, "n/a on CPU (pass --peak_tflops to get an MFU)"
    if dtype != torch.bfloat16:
        return None, f"no table entry for {dtype_name(dtype)} (pass --peak_tflops)"
    name = torch.cuda.get_device_name(device).upper()
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern in name:
            return tflops, f"{pattern} dense bf16 spec, {tflops} TFLOP/s"
    return None, f"unknown GPU {name!r} (pass --peak_tflops)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Mixed precision as the Trainer runs it with --bf16 (accelerate's autocast); nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------------ model building


def build_random_model(model_class, config, device: torch.device, dtype: torch.dtype, attn_implementation: str):
    """A randomly initialised `model_class(config)` on `device` in `dtype`, with `_keep_in_fp32_modules` in fp32.

    This is the layout `from_pretrained(..., dtype=torch.bfloat16)` gives (the IQ-Former / Q-Former and their query
    tokens stay fp32, everything else bf16); `_from_config(dtype=...)` alone would cast those too. The weights are
    created on the device directly, so a 7B model does not first materialise on the host.
    """
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device)
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


# ------------------------------------------------------------------------------------------------ memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        # ru_maxrss is the lifetime peak (KiB on Linux, bytes on macOS): the best we can do without /proc.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _glibc_heap():
    """glibc's `mallinfo2` (bytes in use = small blocks `uordblks` + mmapped blocks `hblkhd`), or None."""
    try:
        import ctypes
        import ctypes.util

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = MallInfo2

        def heap_bytes() -> int:
            info = libc.mallinfo2()
            return info.uordblks + info.hblkhd

        heap_bytes()
        return heap_bytes
    except (OSError, AttributeError, TypeError):
        return None


_HEAP_BYTES = _glibc_heap()


class PeakMemory:
    """Peak memory over a block.

    GPU: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only, allocator cache not
    counted). CPU: the bytes the process has allocated from glibc's heap (mallinfo2: in-use small blocks + mmapped
    blocks; torch's CPU tensors live there), sampled every 2 ms by a thread and at every `poll()` (the benchmarks
    poll at the end of each forward pass, where activation memory peaks). It includes the weights, the optimiser
    state and Python's own objects. Where mallinfo2 is missing, the process RSS (which does not go down when memory
    is freed) is used instead.
    """

    method_cuda = "torch.cuda.max_memory_allocated (reset before the timed steps)"
    method_cpu_heap = ("peak glibc heap in use (mallinfo2 uordblks + hblkhd: all CPU tensors, weights and optimiser "
                       "state included), sampled every 2 ms and at the end of each forward")
    method_cpu_rss = "peak process RSS from /proc/self/statm, sampled every 2 ms and at the end of each forward"

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = None
        self._read = _HEAP_BYTES or _rss_bytes

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return self.method_cuda
        return self.method_cpu_heap if _HEAP_BYTES else self.method_cpu_rss

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = self._read()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def poll(self) -> None:
        if self.device.type != "cuda":
            self.peak_bytes = max(self.peak_bytes, self._read())

    def _sample(self):
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(0.002)

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


# ------------------------------------------------------------------------------------------------ reporting


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_label(device),
        "device_type": device.type,
        "cpu": cpu_model(),
        # Float results on the CPU depend on which vector kernels ATen picks (AVX2 or AVX512): runs on machines of
        # different capability can differ, even with the same seed and library versions.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def machine_lines(info: dict) -> list[str]:
    lines = [
        f"- command: `{info['command']}`",
        f"- date: {info['date']}",
        f"- device: **{info['device']}**"
        + (f" ({info['gpu_memory_gib']} GiB, CUDA {info['cuda']})" if "gpu_memory_gib" in info else ""),
        f"- host: {info['cpu']} ({info['cpu_capability']} kernels), {info['cpu_cores']} cores, "
        f"torch threads {info['torch_threads']}; {info['platform']}",
        f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
    ]
    return lines


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def write_results(stem: str, markdown: str, payload: dict, output_dir: Path | None = None) -> tuple[Path, Path]:
    directory = Path(output_dir) if output_dir else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    md_path, json_path = directory / f"{stem}.md", directory / f"{stem}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return md_path, json_path


def fmt(value, digits: int = 2, missing: str = "n/a") -> str:
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"

