"""The five VIKDF objectives (paper §3.2–3.3), each a small function whose docstring names its equation.

Every loss is a mean over the items it is defined on (pairs, masked pixels, masked tokens, caption tokens, query
slots). The trainer turns them into the weighted sum of eq. 5 + eq. 9.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from processing_vikdf import IGNORE_INDEX


class _GatherWithLocalGradient(torch.autograd.Function):
    """all_gather whose backward returns each rank the gradient of its own slice (summed over ranks)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        # Every rank computed a loss over all gathered rows; the gradient of this rank's rows is the sum.
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_across_ranks(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated (gradient kept for the local slice) and the offset of the local rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    return _GatherWithLocalGradient.apply(tensor), dist.get_rank() * tensor.shape[0]


def tim_similarity(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarities (B_text, B_image). Image embeddings of shape (B, n, T) are max-pooled over queries."""
    if image_embeddings.dim() == 3:
        return torch.einsum("it,jqt->ijq", text_embeddings, image_embeddings).max(-1).values
    return text_embeddings @ image_embeddings.t()


def tim_loss(text_embeddings: torch.Tensor, image_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Text-Image Matching, eq. 2: symmetric InfoNCE between `K_T` and `K_I` with a learnable temperature.

    `logit_scale` is log(1/τ). Negatives are the other pairs of *all* ranks (the released code uses the local
    batch only); each rank scores its own rows against every rank's and keeps the gradient of its local slice.
    Averaged over pairs and both directions.
    """
    all_text, offset = gather_across_ranks(text_embeddings)
    all_image, _ = gather_across_ranks(image_embeddings)
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
    left unchanged included, as released (`vikdf.masking.PixelMasks.scored`); N_i of eq. 3 counts their values
    (every channel of a scored pixel). `reduction="sum"` gives the numerator, for normalising elsewhere.
    """
    mask = pixel_mask.reshape(pixel_mask.shape[0], 1, *pixel_mask.shape[-2:]).expand_as(pixel_values)
    return _reduce((reconstruction.float() - pixel_values.float()).abs()[mask], reduction)


def iamtm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Image-Assisted Masked Text Modeling, eq. 4: cross-entropy on masked caption tokens only.

    `labels` hold the original token at masked positions and -100 elsewhere; N_t of eq. 4 counts masked tokens.
    """
    selected = labels != IGNORE_INDEX
    return _reduce(F.cross_entropy(logits[selected].float(), labels[selected], reduction="none"), reduction)


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


def next_token_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) True where the next token is labelled: the only positions whose logits a next-token loss reads."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def iakr_loss(reconstructed_knowledge: torch.Tensor, knowledge: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Instruction-aware Knowledge Reconstruction, eq. 8: squared error between `K` and `K̂`, averaged over the
    vector width and the N_q query slots (B, n, D).

    As released, `K` is not detached: the reconstruction also shapes the IQ-Former.
    """
    per_slot = (reconstructed_knowledge.float() - knowledge.float()).pow(2).mean(-1)  # (B, n)
    return _reduce(per_slot, reduction)


__all__ = ["tim_loss", "tim_similarity", "tamim_loss", "iamtm_loss", "iaci_loss", "iakr_loss", "gather_across_ranks", "next_token_positions"]
