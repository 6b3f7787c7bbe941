"""Guards on the folders a run writes into: one writer at a time, never a file, never the folder it reads from.

Two runs given one `--output_dir` overwrote each other's checkpoints and final weights, both exiting 0; two
evaluations of one checkpoint lost a model-card row (each read README.md before the other wrote it). A run holds an
advisory lock (`fcntl.flock`) on a lock file inside the folder while it writes; the operating system drops it when
the process ends, however it ends, so a killed run leaves no stale lock. The lock files are named `_*`, which hub
uploads skip (`vikdf.atomic`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

OUTPUT_LOCK = "_output.lock"
MODEL_CARD_LOCK = "_model_card.lock"


def check_output_folder(path: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Refuse an output folder that is an existing file (found before any model loads, not at the first write)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            f"{flag} {str(path)!r} is an existing file, not a folder: give a folder to write into (it is created "
            "when missing)."
        )


def check_not_input_folder(output_dir: str | os.PathLike, source: str | None, source_flag: str) -> None:
    """Refuse writing into the folder the run loads its model from: the final save would replace that checkpoint."""
    if source is None or not (os.path.isdir(source) and os.path.isdir(output_dir)):
        return
    if os.path.samefile(source, output_dir):
        raise ValueError(
            f"--output_dir {str(output_dir)!r} is the {source_flag} folder: saving there would overwrite the "
            "checkpoint this run starts from. Give another --output_dir."
        )


def check_fresh_start(output_dir: str | os.PathLike, resume: str | None) -> None:
    """Refuse a run that starts afresh in a folder holding an earlier run's checkpoints or final model: its saves would
    replace them one by one (a second run with another seed left only its own files, both exiting 0)."""
    if resume is not None or not os.path.isdir(output_dir):
        return
    earlier = sorted(name for name in os.listdir(output_dir)
                     if name.startswith("checkpoint-") or name in ("model.safetensors", "adapter_model.safetensors"))
    if earlier:
        raise FileExistsError(
            f"--output_dir {str(output_dir)!r} holds an earlier run ({', '.join(earlier[:3])}"
            f"{', ...' if len(earlier) > 3 else ''}), which a fresh start would overwrite. Continue it with "
            "--resume_from_checkpoint last, or give another --output_dir (or remove that run yourself)."
        )


@contextmanager
def folder_lock(
    path: str | os.PathLike, flag: str = "--output_dir", name: str = OUTPUT_LOCK, wait: bool = False
) -> Iterator[None]:
    """Hold the lock `name` of folder `path` (created if missing) for the block.

    Taken by another process: wait for it with `wait`, else refuse, naming that process's id (written in the file).
    A folder created here and left without output (the run failed before writing) is removed again.
    """
    check_output_folder(path, flag)
    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, name)
    # "a+" neither truncates the holder's id before the lock is ours nor fails when the file does not exist yet.
    with open(lock_path, "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RuntimeError(
                f"{flag} {str(path)!r} is being written by another run (process {holder}; lock {lock_path}): two "
                f"runs in one folder overwrite each other's files. Wait for it to finish, or give another {flag}."
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield  # closing the file releases the lock
        finally:
            if created and os.listdir(path) == [name]:
                os.remove(lock_path)
                os.rmdir(path)


def writer_lock(path: str | os.PathLike, writes: bool, flag: str = "--output_dir") -> AbstractContextManager:
    """The output folder's lock, held by the process of a run that writes there; its other processes only check
    that the folder is not a file."""
    check_output_folder(path, flag)
    return folder_lock(path, flag) if writes else nullcontext()


__all__ = [
    "OUTPUT_LOCK", "MODEL_CARD_LOCK", "check_output_folder", "check_not_input_folder", "check_fresh_start",
    "folder_lock", "writer_lock",
]
