"""Saves that a kill cannot leave half-written: files and folders are written under a temporary name, then renamed.

A rename within one file system is atomic, so a reader sees either the old state or the complete new one. Staging
folders are named `_saving-*`: `get_last_checkpoint` and checkpoint rotation only look at `checkpoint-*`, and hub
uploads ignore `_*`.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

logger = logging.get_logger(__name__)

STAGING_PREFIX = "_saving-"
TRAINER_STATE_NAME = "trainer_state.json"
# The file every loader opens first; moved last, so that a folder showing it holds everything else.
COMMIT_FILE = "config.json"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def staging_folder(target: str | os.PathLike, name: str) -> Path:
    """A fresh, empty staging folder `target/_saving-{name}` (a leftover of an interrupted save is removed)."""
    staged = Path(target) / f"{STAGING_PREFIX}{name}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def commit_folder(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the complete folder `staged` to `target`.

    A new `target` is one rename. Into an existing folder (a run's output folder, which also holds the
    checkpoints) every entry is renamed over its old version, `config.json` last, and `staged` is removed.
    """
    staged, target = Path(staged), Path(target)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        return target
    entries = sorted(staged.iterdir(), key=lambda entry: entry.name == COMMIT_FILE)
    for entry in entries:
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staged.rmdir()
    return target


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """A Trainer checkpoint whose last file, `trainer_state.json`, was written whole."""
    try:
        json.loads((Path(folder) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def damaged_file(folder: str | os.PathLike) -> str | None:
    """The first file of a checkpoint whose contents cannot be read, with the reason (None when all can).

    Reads only each tensor file's index (the safetensors header, the `torch.save` archive's directory), and parses
    JSON files (`frozen_parts.json`, the configs): a truncated or overwritten file fails there, so a resume is not
    stopped later by an error that names no file. Subfolders are read too (DeepSpeed's `global_step*/`).
    """
    for path in sorted(path for path in Path(folder).rglob("*") if path.is_file()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(path).close()
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (SafetensorError, zipfile.BadZipFile, OSError, ValueError) as error:
            return f"{path} ({type(error).__name__}: {error})"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-N` of `output_dir` with the highest N that is complete and readable (None when there is
    none); a damaged one is passed over with a warning naming its file."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for entry in folder.iterdir():
        prefix, _, step = entry.name.rpartition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and entry.is_dir():
            steps.append((int(step), entry))
    for _, checkpoint in sorted(steps, reverse=True):
        if not is_complete_checkpoint(checkpoint):
            continue
        damage = damaged_file(checkpoint)
        if damage is None:
            return checkpoint
        logger.warning(f"Passing over {checkpoint}: {damage} cannot be read.")
    return None


__all__ = [
    "STAGING_PREFIX",
    "write_text_atomic",
    "staging_folder",
    "commit_folder",
    "is_complete_checkpoint",
    "damaged_file",
    "last_complete_checkpoint",
]
