"""Masks for the two masked-modelling objectives of knowledge distillation (paper §3.2.2–3.2.3, §4.2; DESIGN §3).

* TAMIM (eq. 3): the image is masked in square pixel patches (28×28 at 224, i.e. an 8×8 grid) at ratio 0.6;
  the released code leaves 20 % of the chosen patches unmasked, so mask_ratio × (1 − keep_ratio) ≈ 48 % of the
  patches are actually masked. Masked pixels are set to 0 *after* normalisation, and eq. 3 averages the L1 error
  over the masked pixels only.
* IAMTM (eq. 4): 15 % of the caption tokens are replaced by a given id (CLIP has no mask token; the release
  writes CLIP's end-of-text id, 49407), never special tokens or padding; eq. 4 averages the cross-entropy over the
  masked positions, so every non-empty caption gets at least one.

Pure torch. Randomness comes from an optional `torch.Generator` (CPU), drawn on the CPU, so that a seed gives the
same masks on any device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

IGNORE_INDEX = -100  # label of unmasked positions, ignored by torch.nn.functional.cross_entropy


# --------------------------------------------------------------------------------------------------- TAMIM


def num_masked_patches(num_patches: int, mask_ratio: float = 0.6, keep_ratio: float = 0.2) -> int:
    """How many patches are actually masked: ⌊num_patches·mask_ratio⌋ chosen, ⌊chosen·keep_ratio⌋ of them left.

    At least one whenever mask_ratio > 0 and keep_ratio < 1, so that eq. 3's mean over masked pixels is defined
    (8×8 grid, 0.6, 0.2: 38 chosen, 7 left, 31 masked).
    """
    if not 0.0 <= mask_ratio <= 1.0 or not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"mask_ratio and keep_ratio must lie in [0, 1], got {mask_ratio} and {keep_ratio}")
    chosen = int(num_patches * mask_ratio)
    masked = chosen - int(chosen * keep_ratio)
    return max(masked, 1) if mask_ratio > 0 and keep_ratio < 1 else masked


def tamim_pixel_mask(
    height: int = 224,
    width: int = 224,
    *,
    batch_size: int | None = None,
    patch_size: int = 28,
    mask_ratio: float = 0.6,
    keep_ratio: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean pixel mask for TAMIM (paper eq. 3, §4.2): True where a pixel is masked.

    The image is cut into `patch_size`² patches; exactly `num_masked_patches(...)` of them, drawn uniformly
    without replacement, are masked in each image. (Choosing mask_ratio of the patches and then un-choosing
    keep_ratio of those, as the release does, gives the same distribution: a uniform subset of that size.)
    Returns `(height, width)`, or `(batch_size, height, width)` with an independent mask per image.
    """
    if height % patch_size or width % patch_size:
        raise ValueError(f"Image size {height}×{width} is not a multiple of the mask patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    n_masked = num_masked_patches(grid_h * grid_w, mask_ratio, keep_ratio)
    batch = 1 if batch_size is None else batch_size
    scores = torch.rand(batch, grid_h * grid_w, generator=generator)
    chosen = scores.argsort(dim=1)[:, :n_masked]
    patches = torch.zeros(batch, grid_h * grid_w, dtype=torch.bool).scatter_(1, chosen, True)
    pixels = patches.view(batch, grid_h, 1, grid_w, 1).expand(batch, grid_h, patch_size, grid_w, patch_size)
    pixels = pixels.reshape(batch, height, width).to(device)
    return pixels[0] if batch_size is None else pixels


def apply_pixel_mask(pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked image I' of eq. 3: normalised `pixel_values` (`(C, H, W)` or `(B, C, H, W)`) with the pixels where
    `mask` (`(H, W)` or `(B, H, W)`) is True set to 0, on every channel. Returns a new tensor."""
    return pixel_values.masked_fill(mask.to(pixel_values.device).unsqueeze(-3), 0.0)


def mask_images(
    pixel_values: torch.Tensor,
    *,
    patch_size: int = 28,
    mask_ratio: float = 0.6,
    keep_ratio: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched TAMIM masking of normalised images `(B, C, H, W)`: returns (masked images, pixel mask `(B, H, W)`).

    The mask is what eq. 3's loss averages over; expand it to `(B, C, H, W)` to select channels too.
    """
    batch, _, height, width = pixel_values.shape
    mask = tamim_pixel_mask(
        height,
        width,
        batch_size=batch,
        patch_size=patch_size,
        mask_ratio=mask_ratio,
        keep_ratio=keep_ratio,
        generator=generator,
        device=pixel_values.device,
    )
    return apply_pixel_mask(pixel_values, mask), mask


# --------------------------------------------------------------------------------------------------- IAMTM


def mask_caption_tokens(
    input_ids: torch.Tensor,
    replacement_id: int,
    *,
    attention_mask: torch.Tensor | None = None,
    special_tokens_mask: torch.Tensor | None = None,
    special_token_ids: Iterable[int] | None = None,
    mask_ratio: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption masking for IAMTM (paper eq. 4, §4.2): returns (masked `input_ids`, `labels`), both `(B, L)`.

    Each eligible token is chosen with probability `mask_ratio` (BERT-style) and replaced by `replacement_id`
    (CLIP has no mask token; the release uses end-of-text, 49407). Eligible = not padding (`attention_mask`) and
    not special (`special_tokens_mask` from the tokenizer, and/or `special_token_ids`; at least one is required,
    because CLIP's pad id equals its end-of-text id, so ids alone cannot tell padding from text). A caption with
    an eligible token but none drawn gets one drawn uniformly, so that eq. 4 is defined for every caption.
    `labels` hold the original id at masked positions and -100 elsewhere.
    """
    if special_tokens_mask is None and special_token_ids is None:
        raise ValueError("Pass special_tokens_mask and/or special_token_ids: special tokens must never be masked")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}")
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

    masked_ids = input_ids.masked_fill(chosen, replacement_id)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked_ids, labels
