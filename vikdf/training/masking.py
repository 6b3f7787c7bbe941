"""Masks for the two masked-modelling objectives of knowledge distillation (paper §3.2.2–3.2.3, §4.2; the release's
masking: README, "Conventions and where we differ from the release").

Each objective has a *scored* set (where its loss is averaged) and a *replaced* set (what the encoder does not
see). The defaults are the authors' release; `keep_ratio=0` gives the paper's plain recipe, in which the two sets
are the same.

* TAMIM (eq. 3): ⌈mask_ratio · patches⌉ square pixel patches are chosen (28×28 at 224, an 8×8 grid, ratio 0.6:
  39 of 64). Inside them, each sub-patch of the vision tower's patch size (14×14: four per 28-px patch) is left
  unchanged with probability `keep_ratio` (release: 0.2) and set to 0 otherwise, *after* normalisation. The L1
  loss is averaged over every pixel of the chosen patches, unchanged sub-patches included.
* IAMTM (eq. 4): each caption token is chosen with probability `mask_ratio` (0.15), never special tokens or
  padding. A chosen token is left unchanged with probability `keep_ratio` (release: 0.2) and replaced by a given
  id otherwise (CLIP has no mask token; the release writes CLIP's end-of-text id, 49407; no random tokens). The
  cross-entropy is averaged over every chosen token, unchanged ones included.

Pure torch (`apply_pixel_mask` is the model's). Randomness comes from an optional `torch.Generator` (CPU), drawn
on the CPU, so that a seed gives the same masks on any device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

# The model owns I' of eq. 3, since its pre-training forward masks the images it is given; named here too so that
# the masks and the function that applies them are imported together.
from modeling_vikdf import apply_pixel_mask  # noqa: F401
from processing_vikdf import IGNORE_INDEX


# --------------------------------------------------------------------------------------------------- TAMIM


class PixelMasks(NamedTuple):
    """Boolean pixel masks of TAMIM, True where a pixel belongs to the set."""

    scored: torch.Tensor  # every pixel of the chosen patches: where eq. 3 averages the L1 error
    replaced: torch.Tensor  # the pixels set to 0 in the masked image: scored minus the unchanged sub-patches


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def num_chosen_patches(num_patches: int, mask_ratio: float = 0.6) -> int:
    """How many patches TAMIM chooses: ⌈num_patches · mask_ratio⌉, as the release rounds (8×8 grid, 0.6: 39)."""
    _check_ratio("mask_ratio", mask_ratio)
    return math.ceil(num_patches * mask_ratio)


def _upsample(cells: torch.Tensor, size: int) -> torch.Tensor:
    """(B, gh, gw) cell mask → (B, gh·size, gw·size) pixel mask."""
    batch, grid_h, grid_w = cells.shape
    pixels = cells.view(batch, grid_h, 1, grid_w, 1).expand(batch, grid_h, size, grid_w, size)
    return pixels.reshape(batch, grid_h * size, grid_w * size)


def tamim_pixel_masks(
    height: int = 224,
    width: int = 224,
    *,
    batch_size: int | None = None,
    patch_size: int = 28,
    subpatch_size: int = 14,
    mask_ratio: float = 0.6,
    keep_ratio: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> PixelMasks:
    """TAMIM masks (paper eq. 3, §4.2): the scored and the replaced pixels.

    Exactly `num_chosen_patches(...)` of the `patch_size`² patches, drawn uniformly without replacement, are
    scored in each image. Each `subpatch_size`² sub-patch of a chosen patch (the vision tower's patch size) is
    replaced independently with probability 1 − `keep_ratio`; `keep_ratio=0` replaces every scored pixel.
    Each mask is `(height, width)`, or `(batch_size, height, width)` with an independent draw per image.
    """
    if height % patch_size or width % patch_size:
        raise ValueError(f"Image size {height}×{width} is not a multiple of the mask patch size {patch_size}")
    if patch_size % subpatch_size:
        raise ValueError(f"The mask patch size {patch_size} is not a multiple of the sub-patch size {subpatch_size}")
    _check_ratio("keep_ratio", keep_ratio)
    grid_h, grid_w = height // patch_size, width // patch_size
    n_chosen = num_chosen_patches(grid_h * grid_w, mask_ratio)
    batch = 1 if batch_size is None else batch_size
    scores = torch.rand(batch, grid_h * grid_w, generator=generator)
    chosen = scores.argsort(dim=1)[:, :n_chosen]
    patches = torch.zeros(batch, grid_h * grid_w, dtype=torch.bool).scatter_(1, chosen, True)
    scale = patch_size // subpatch_size
    chosen_cells = _upsample(patches.view(batch, grid_h, grid_w), scale)
    kept = torch.rand(chosen_cells.shape, generator=generator) < keep_ratio
    scored = _upsample(chosen_cells, subpatch_size).to(device)
    replaced = _upsample(chosen_cells & ~kept, subpatch_size).to(device)
    if batch_size is None:
        return PixelMasks(scored[0], replaced[0])
    return PixelMasks(scored, replaced)


# --------------------------------------------------------------------------------------------------- IAMTM


def mask_caption_tokens(
    input_ids: torch.Tensor,
    replacement_id: int,
    *,
    attention_mask: torch.Tensor | None = None,
    special_tokens_mask: torch.Tensor | None = None,
    special_token_ids: Iterable[int] | None = None,
    mask_ratio: float = 0.15,
    keep_ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption masking for IAMTM (paper eq. 4, §4.2): returns (masked `input_ids`, `labels`), both `(B, L)`.

    Each eligible token is chosen with probability `mask_ratio` (BERT-style). A chosen token is left unchanged
    with probability `keep_ratio` (release: 0.2; 0 replaces every chosen token) and otherwise replaced by
    `replacement_id` (CLIP has no mask token; the release uses end-of-text, 49407, never a random token).
    Eligible = not padding (`attention_mask`) and not special (`special_tokens_mask` from the tokenizer, and/or
    `special_token_ids`; at least one is required, because CLIP's pad id equals its end-of-text id, so ids alone
    cannot tell padding from text). A caption with an eligible token but none drawn gets one drawn uniformly, so
    that eq. 4 is defined for every caption (the release, averaging over the batch, leaves such a caption out).
    `labels` hold the original id at every chosen position (unchanged ones too: the release scores them) and
    -100 elsewhere.
    """
    if special_tokens_mask is None and special_token_ids is None:
        raise ValueError("Pass special_tokens_mask and/or special_token_ids: special tokens must never be masked")
    _check_ratio("mask_ratio", mask_ratio)
    _check_ratio("keep_ratio", keep_ratio)
    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    if special_tokens_mask is not None:
        eligible &= ~special_tokens_mask.bool()
    if special_token_ids is not None:
        special = torch.tensor(list(special_token_ids), dtype=input_ids.dtype, device=input_ids.device)
        eligible &= ~torch.isin(input_ids, special)

    scores = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    chosen = (scores < mask_ratio) & eligible
    if mask_ratio > 0:
        # the eligible token with the lowest score is the one Bernoulli sampling would pick first
        needs_one = eligible.any(dim=1) & ~chosen.any(dim=1)
        first = scores.masked_fill(~eligible, 2.0).argmin(dim=1)
        chosen[needs_one, first[needs_one]] = True

    kept = torch.rand(input_ids.shape, generator=generator).to(input_ids.device) < keep_ratio
    masked_ids = input_ids.masked_fill(chosen & ~kept, replacement_id)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked_ids, labels
