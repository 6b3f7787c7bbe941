"""The frozen parts of a VIKDF run: where each came from and a fingerprint of its weights (`frozen_parts.json`).

A checkpoint written during training holds the trainable parameters only (`vikdf.training.trainable_checkpoints`); the
CLIP towers and the LLM, frozen in both stages (paper §3.4.1), are rebuilt from their sources when a run resumes. The
record written with each checkpoint lets the resumed run prove that it rebuilt the same weights: for every frozen
component (a top-level module of the VIKDF model, e.g. `text_encoder`, `vision_encoder`, `language_model`; `iq_former`
when it is frozen) its source (a Hub id and the revision its config was loaded at, or a folder) and a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

FROZEN_PARTS_NAME = "frozen_parts.json"
FINGERPRINT_METHOD = "sha256 over each tensor's name, dtype, shape and bytes, in sorted name order"

# The VIKDF components each pretrained part gives (`vikdf.training.components.build_vikdf_from_components`).
PART_COMPONENTS = {
    "clip": ("text_encoder", "text_projection", "vision_encoder", "visual_projection"),
    "bert": ("iq_former",),
    "llm": ("language_model",),
}


def source_record(source: str) -> dict[str, str | None]:
    """Where a component came from: a folder (as an absolute path), or a Hub id with the revision its config was
    loaded at (the config's `_commit_hash`; None for a folder)."""
    from transformers import PretrainedConfig

    revision = PretrainedConfig.get_config_dict(source)[0].get("_commit_hash")
    return {"source": os.path.abspath(source) if os.path.isdir(source) else source, "revision": revision}


def sources_from_parts(clip: str, bert: str, llm: str) -> dict[str, dict[str, str | None]]:
    """`frozen_sources` of a model built from pretrained parts: each component mapped to its part's record."""
    records = {"clip": source_record(clip), "bert": source_record(bert), "llm": source_record(llm)}
    return {component: records[part] for part, components in PART_COMPONENTS.items() for component in components}


def sources_from_checkpoint(model: nn.Module, checkpoint: str) -> dict[str, dict[str, str | None]]:
    """`frozen_sources` of a model loaded from one VIKDF checkpoint: every component comes from it."""
    record = source_record(checkpoint)
    return {name.split(".")[0]: record for name in model.state_dict()}


def vikdf_module(model: nn.Module) -> nn.Module:
    """The VIKDF model under a peft wrapper (with the adapters injected), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def frozen_components(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The entries of `model`'s state dict that do not train, grouped by top-level module of the VIKDF model.

    Buffers are included: a bitsandbytes-quantised LLM keeps its packed weights' quantisation state there.
    """
    components: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in vikdf_module(model).state_dict(keep_vars=True).items():
        if not value.requires_grad:
            components.setdefault(name.split(".")[0], {})[name] = value
    return components


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted name order.

    The bytes, not a safetensors header: a header names dtypes, shapes and offsets only, so it does not change when
    one value does. Bytes are read through a contiguous CPU copy viewed as uint8, which works for non-contiguous
    tensors, 0-dim ones and dtypes numpy lacks (bf16), and for bitsandbytes' tensor subclasses (read as plain tensors).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().as_subclass(torch.Tensor).cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8)
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0{raw.numel()}\0".encode())
        digest.update(raw.numpy())
    return digest.hexdigest()


def frozen_fingerprints(model: nn.Module) -> dict[str, str]:
    """The fingerprint of every frozen component of `model`."""
    return {component: fingerprint(tensors) for component, tensors in frozen_components(model).items()}


def frozen_parts_record(fingerprints: Mapping[str, str], sources: Mapping[str, Mapping[str, str | None]]) -> dict:
    """The contents of `frozen_parts.json`; a component with no known source is recorded with source null."""
    unknown = {"source": None, "revision": None}
    return {
        "fingerprint": FINGERPRINT_METHOD,
        "components": {
            component: {**dict(sources.get(component, unknown)), "fingerprint": value}
            for component, value in sorted(fingerprints.items())
        },
    }


def write_frozen_parts(folder: str | os.PathLike, record: dict) -> None:
    (Path(folder) / FROZEN_PARTS_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def check_frozen_parts(checkpoint: str | os.PathLike, fingerprints: Mapping[str, str],
                       sources: Mapping[str, Mapping[str, str | None]]) -> None:
    """Refuse to resume `checkpoint` when this run's frozen components differ from the ones it was trained with."""
    path = Path(checkpoint) / FROZEN_PARTS_NAME
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["components"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path} cannot be read ({error}); resume from another checkpoint.") from error
    advice = (
        "A checkpoint holds only the trainable parameters, so a resumed run must rebuild the same frozen weights: "
        "rebuild from the same source (revision, --seed, --precision and quantisation), or resume from a full "
        "checkpoint (one written with --save_full_model)."
    )
    if recorded.keys() != fingerprints.keys():
        raise ValueError(
            f"{checkpoint} was trained with frozen components {sorted(recorded)}, this run has {sorted(fingerprints)}: "
            f"the trainable parts differ (another stage, --method or --freeze_iq_former?). {advice}"
        )
    for component, entry in recorded.items():
        if entry["fingerprint"] != fingerprints[component]:
            now = sources.get(component, {}).get("source")
            raise ValueError(
                f"The frozen component {component!r} differs from the one {checkpoint} was trained with: fingerprint "
                f"{entry['fingerprint']} in {path} (source {entry['source']}, revision {entry['revision']}), "
                f"{fingerprints[component]} in this run (source {now}). {advice}"
            )


__all__ = [
    "FROZEN_PARTS_NAME",
    "source_record",
    "sources_from_parts",
    "sources_from_checkpoint",
    "vikdf_module",
    "frozen_components",
    "fingerprint",
    "frozen_fingerprints",
    "frozen_parts_record",
    "write_frozen_parts",
    "check_frozen_parts",
]
