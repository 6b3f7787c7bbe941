"""The five VIKDF objectives (paper §3.2–3.3), each a small function whose docstring names its equation.

Every loss is a mean over the items it is defined on (pairs, masked pixels, masked tokens, caption tokens, query
slots). The trainer turns them into the weighted sum of eq. 5 + eq. 9.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather

from modeling_vikdf import next_token_positions
from processing_vikdf import IGNORE_INDEX


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process in the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_across_ranks(
    tensor: torch.Tensor, rank: int | None = None, world_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """All `world_size` ranks' rows concatenated and the offset of this rank's rows, as open_clip's `ClipLoss` gathers
    (`rank` and `world_size` default to `process_rank()`). The gather's backward gives each rank the gradient of its
    own rows summed over every rank's loss."""
    if rank is None or world_size is None:
        rank, world_size = process_rank()
    if world_size == 1:
        return tensor, 0
    # Gathered as rows (B, ·): the gather's backward sends each rank's gradient rows as they lie in memory (gloo's
    # all-to-all), and the gradient of the max-pooled (B, n, T) image embeddings is not laid out contiguously.
    gathered = torch.cat(all_gather(tensor.flatten(1)))
    return gathered.view(-1, *tensor.shape[1:]), rank * tensor.shape[0]


def tim_similarity(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (B_text, B_image). Image embeddings of shape (B, n, T) are max-pooled over queries."""
    if image_embeddings.dim() == 3:
        return torch.einsum("it,jqt->ijq", text_embeddings, image_embeddings).max(-1).values
    return text_embeddings @ image_embeddings.t()


def tim_loss(
    text_embeddings: torch.Tensor,
    image_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.Tensor:
    """Text-Image Matching, eq. 2: symmetric InfoNCE between `K_T` and `K_I` with a learnable temperature.

    `logit_scale` is log(1/τ). Negatives are the other pairs of all `world_size` ranks (the released code uses the
    local batch only); each rank scores its own rows against every rank's and keeps the gradient of its local slice.
    `rank` and `world_size` are as in `gather_across_ranks`. Averaged over pairs and both directions.
    """
    all_text, offset = gather_across_ranks(text_embeddings, rank, world_size)
    all_image, _ = gather_across_ranks(image_embeddings, rank, world_size)
    scale = logit_scale.clamp(max=torch.log(torch.tensor(100.0))).exp()
    rows = torch.arange(text_embeddings.shape[0], device=text_embeddings.device)
    targets = rows + offset
    text_to_image = scale * tim_similarity(text_embeddings, all_image)  # (B, N)
    image_to_text = scale * tim_similarity(all_text, image_embeddings).t()  # (B, N)
    return (F.cross_entropy(text_to_image, targets) + F.cross_entropy(image_to_text, targets)) / 2


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        # An empty selection (nothing masked) contributes zero rather than NaN.
        return values.mean() if values.numel() else values.sum()
    raise ValueError(f"reduction={reduction!r}; use 'mean' or 'sum'.")


def tamim_loss(
    reconstruction: torch.Tensor, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Text-Assisted Masked Image Modeling, eq. 3: L1 between original and rebuilt pixels, on the scored pixels.

    `pixel_mask` (B, 1, H, W) or (B, H, W) is True on the scored pixels: every pixel of the chosen patches, those
    left unchanged included, as released (`vikdf.training.masking.PixelMasks.scored`); N_i of eq. 3 counts their values
    (every channel of a scored pixel). `reduction="sum"` gives the numerator, for normalising elsewhere.
    """
    mask = pixel_mask.reshape(pixel_mask.shape[0], 1, *pixel_mask.shape[-2:]).expand_as(pixel_values)
    return _reduce((reconstruction.float() - pixel_values.float()).abs()[mask], reduction)


def iamtm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Image-Assisted Masked Text Modeling, eq. 4: cross-entropy on masked caption tokens only.

    `labels` hold the original token at masked positions and -100 elsewhere; N_t of eq. 4 counts masked tokens.
    `logits` are (..., V) aligned with `labels`, or (M, V) at the masked tokens only (what the model computes).
    """
    selected = labels != IGNORE_INDEX
    if logits.shape[:-1] == labels.shape:
        logits = logits[selected]
    return _reduce(F.cross_entropy(logits.float(), labels[selected], reduction="none"), reduction)


def iaci_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Instruction-aware Contextual Inference, eq. 6: next-token NLL of the caption given K and the prompt.

    `labels` are aligned with the inputs (-100 on knowledge, prompt and padding); the shift happens here, so N_t
    of eq. 6 counts the labelled tokens: the caption's, and its end-of-sequence only with
    `config.caption_loss_on_eos` (the release leaves eos out). `logits` are (B, S, V), or (M, V) at
    `next_token_positions(labels)` only (what the trainer computes).
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    if logits.dim() == 3:
        logits = logits[:, :-1][selected]
    return _reduce(F.cross_entropy(logits.float(), targets[selected], reduction="none"), reduction)


def iakr_loss(reconstructed_knowledge: torch.Tensor, knowledge: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Instruction-aware Knowledge Reconstruction, eq. 8: squared error between `K` and `K̂`, averaged over the
    vector width and the N_q query slots (B, n, D).

    As released, `K` is not detached: the reconstruction also shapes the IQ-Former.
    """
    per_slot = (reconstructed_knowledge.float() - knowledge.float()).pow(2).mean(-1)  # (B, n)
    return _reduce(per_slot, reduction)


__all__ = ["tim_loss", "tim_similarity", "tamim_loss", "iamtm_loss", "iaci_loss", "iakr_loss", "gather_across_ranks",
           "process_rank", "next_token_positions"]
