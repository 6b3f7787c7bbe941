"""A checkpoint's pair-stream position, stored without pickle: `pair_stream_<rank>.safetensors`.

Checkpoints travel (the Hub, shared disks), and unpickling a file runs whatever code it names. The state of
torchdata's `StatefulDataLoader` (nested dicts, lists and tuples of numbers and strings, and the shuffle buffer's
`PairRecord`s with their undecoded image bytes, see `MixedPairDataset.state_dict`) is written as JSON in the
safetensors header, each byte string or tensor as a tensor of the file; reading it back runs no code. Values JSON
has no type for are objects tagged `TAG`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vikdf.data.pairs import PairRecord

STATE_KEY = "pair_stream"
TAG = "$type"


def stream_state_name(process_index: int) -> str:
    """A checkpoint's file holding one process's pair-stream position (`MixedPairDataset.state_dict` per worker)."""
    return f"pair_stream_{process_index}.safetensors"


def pickled_stream_state_name(process_index: int) -> str:
    """The pickle earlier versions wrote instead; recognised to be refused, never loaded."""
    return f"pair_stream_{process_index}.pt"


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _store(self, tensor: torch.Tensor) -> str:
        name = str(len(self.tensors))
        self.tensors[name] = tensor.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return name

    def encode(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, list):
            return [self.encode(item) for item in value]
        if isinstance(value, tuple):
            return {TAG: "tuple", "items": [self.encode(item) for item in value]}
        if isinstance(value, dict):
            if all(isinstance(key, str) for key in value) and TAG not in value:
                return {key: self.encode(item) for key, item in value.items()}
            return {TAG: "dict", "items": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        if isinstance(value, (bytes, bytearray)):
            return {TAG: "bytes", "tensor": self._store(torch.tensor(np.frombuffer(bytes(value), dtype=np.uint8)))}
        if isinstance(value, torch.Tensor):
            return {TAG: "tensor", "tensor": self._store(value)}
        if isinstance(value, PairRecord):
            return {TAG: "pair", "fields": {f.name: self.encode(getattr(value, f.name)) for f in fields(value)}}
        if isinstance(value, Image.Image):  # an already decoded image in the buffer: kept losslessly as PNG
            png = io.BytesIO()
            value.save(png, format="PNG")
            return self.encode(png.getvalue())
        raise TypeError(
            f"The pair stream's state holds a {type(value).__name__}, which its checkpoint file cannot store."
        )


def _decode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, path) for item in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG)
    if kind is None:
        return {key: _decode(item, tensors, path) for key, item in value.items()}
    if kind == "tuple":
        return tuple(_decode(item, tensors, path) for item in value["items"])
    if kind == "dict":
        return {_decode(k, tensors, path): _decode(v, tensors, path) for k, v in value["items"]}
    if kind == "bytes":
        return tensors[value["tensor"]].numpy().tobytes()
    if kind == "tensor":
        return tensors[value["tensor"]]
    if kind == "pair":
        return PairRecord(**{name: _decode(item, tensors, path) for name, item in value["fields"].items()})
    raise ValueError(f"{path}: unknown value type {kind!r} in the pair stream's state.")


def save_stream_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a `StatefulDataLoader.state_dict()` to `path` (see the module docstring)."""
    encoder = _Encoder()
    header = json.dumps(encoder.encode(state))
    save_file(encoder.tensors, str(path), metadata={STATE_KEY: header})


def _open(path: str, tensors: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON of `path`'s header, and its tensors when asked for."""
    try:
        with safe_open(path, "pt") as f:
            header = json.loads((f.metadata() or {})[STATE_KEY])
            return header, {name: f.get_tensor(name) for name in f.keys()} if tensors else {}
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable pair-stream state ({type(error).__name__}: {error}). Resume from another "
            "checkpoint, or pass --ignore_data_skip to start the pair stream afresh."
        ) from None


def load_stream_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state `save_stream_state` wrote, for `StatefulDataLoader.load_state_dict`."""
    header, tensors = _open(str(path), tensors=True)
    return _decode(header, tensors, str(path))


def _layout(state: dict[str, Any]) -> tuple[int | None, int]:
    """(processes or None when the state does not say, DataLoader workers) of a saved loader state."""
    snapshot = state.get("_snapshot")
    if snapshot is None:  # no workers: the dataset was read in the main process
        workers, readers = 0, [state.get("dataset_state") or {}]
    else:
        workers = snapshot["_main_snapshot"]["_num_workers"]
        readers = [worker.get("dataset_state") or {} for worker in snapshot["_worker_snapshots"].values()]
    count = next((reader["readers"] for reader in readers if reader.get("reader") is not None), None)
    return (None if count is None else count // max(workers, 1)), workers


def check_stream_resume(checkpoint: str | None, args) -> str | None:
    """The checkpoint's stream-state file for this process (None when it has none: the Trainer then reads the
    consumed batches again), checked against this run's `TrainingArguments` before anything loads.

    Refused: a pickled state of an earlier version, and another layout of processes × DataLoader workers, which
    splits the shards differently (`current_partition`) so that no saved reader position applies.
    """
    if checkpoint is None or args.ignore_data_skip:
        return None
    path = os.path.join(checkpoint, stream_state_name(args.process_index))
    if not os.path.isfile(path):
        pickled = os.path.join(checkpoint, pickled_stream_state_name(args.process_index))
        if os.path.isfile(pickled):
            raise ValueError(
                f"{pickled} holds the pair stream's position as a pickle (written by an earlier version), which is "
                "never loaded: unpickling a file runs any code it names. Pass --ignore_data_skip to resume the model, "
                "optimizer and schedule with the pair stream started afresh."
            )
        return None
    saved = _layout(_open(path, tensors=False)[0])
    current = (args.world_size, args.dataloader_num_workers)
    if saved[1] != current[1] or saved[0] not in (None, current[0]):
        processes = "?" if saved[0] is None else saved[0]
        raise ValueError(
            f"{path} was saved by {processes} process(es) × {saved[1]} DataLoader worker(s); this run has "
            f"{current[0]} process(es) × {current[1]} DataLoader worker(s). Resume with {processes} process(es) and "
            f"--dataloader_num_workers {saved[1]}, or pass --ignore_data_skip to start the pair stream afresh."
        )
    return path


__all__ = [
    "stream_state_name",
    "pickled_stream_state_name",
    "save_stream_state",
    "load_stream_state",
    "check_stream_resume",
]
