"""TAMIM pixel masks and IAMTM caption-token masks (vikdf/training/masking.py; paper eq. 3–4, §4.2)."""

import pytest
import torch

from vikdf.training.masking import (
    IGNORE_INDEX,
    apply_pixel_mask,
    mask_caption_tokens,
    num_chosen_patches,
    tamim_pixel_masks,
)

CLIP_BOS, CLIP_EOS = 49406, 49407  # CLIP's pad id is its end-of-text id too


def _patch_grid(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(…, H, W) pixel mask → (…, H/p, W/p, p·p) values of each patch."""
    *lead, h, w = mask.shape
    grid = mask.reshape(*lead, h // patch, patch, w // patch, patch).movedim(-3, -2)
    return grid.reshape(*lead, h // patch, w // patch, patch * patch)


def _whole_patches(mask: torch.Tensor, patch: int) -> bool:
    patches = _patch_grid(mask, patch)
    return bool(torch.all(patches.all(-1) | ~patches.any(-1)))


def test_release_setting_scores_39_of_64_patches_and_replaces_about_80_percent_of_their_sub_patches():
    # §4.2: 28×28 patches at ratio 0.6 on 224 (8×8 grid); the release chooses ceil(0.6·64) = 39 and scores them all
    assert num_chosen_patches(64, 0.6) == 39
    scored, replaced = tamim_pixel_masks(224, 224, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert scored.shape == replaced.shape == (64, 224, 224) and scored.dtype == replaced.dtype == torch.bool
    assert _whole_patches(scored, 28) and _whole_patches(replaced, 14)
    assert torch.all(_patch_grid(scored, 28).all(-1).sum(dim=(1, 2)) == 39)
    assert int(scored.sum()) == 64 * 39 * 28 * 28
    assert not (replaced & ~scored).any()  # only chosen pixels are replaced
    # each 14-px sub-patch of a chosen patch stays unchanged with probability 0.2, independently
    replaced_share = replaced.sum().item() / scored.sum().item()
    assert 0.77 < replaced_share < 0.83
    partly_kept = _patch_grid(replaced, 28).any(-1) & ~_patch_grid(replaced, 28).all(-1)
    assert partly_kept.any()


def test_keep_ratio_zero_is_the_plain_recipe_and_scored_equals_replaced():
    scored, replaced = tamim_pixel_masks(224, 224, keep_ratio=0.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(scored, replaced) and int(scored.sum()) == 39 * 28 * 28


def test_batched_masks_are_independent_exact_and_seeded():
    masks = tamim_pixel_masks(224, 224, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert torch.all(_patch_grid(masks.scored, 28).all(-1).sum(dim=(1, 2)) == 39)
    assert len({tuple(m[::28, ::28].flatten().tolist()) for m in masks.scored}) > 1
    again = tamim_pixel_masks(224, 224, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masks.scored, again.scored) and torch.equal(masks.replaced, again.replaced)
    other = tamim_pixel_masks(224, 224, batch_size=16, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(masks.scored, other.scored)


def test_replaced_pixels_are_zero_and_others_unchanged():
    images = torch.randn(4, 3, 224, 224)
    masks = tamim_pixel_masks(224, 224, batch_size=4, generator=torch.Generator().manual_seed(3))
    masked = apply_pixel_mask(images, masks.replaced)
    assert masks.scored.shape == (4, 224, 224)
    channel_mask = masks.replaced.unsqueeze(1).expand_as(images)
    assert torch.all(masked[channel_mask] == 0)
    assert torch.equal(masked[~channel_mask], images[~channel_mask])
    assert torch.equal(images, images.clone())  # input untouched
    single = apply_pixel_mask(images[0], masks.replaced[0])
    assert torch.equal(single, masked[0])


def test_mask_edge_cases():
    with pytest.raises(ValueError, match="multiple of the mask patch size"):
        tamim_pixel_masks(224, 224, patch_size=30)
    with pytest.raises(ValueError, match="sub-patch size"):
        tamim_pixel_masks(224, 224, patch_size=28, subpatch_size=8)
    with pytest.raises(ValueError, match="keep_ratio"):
        tamim_pixel_masks(224, 224, keep_ratio=1.5)
    assert num_chosen_patches(4, 0.1) == 1  # ceil: eq. 3 always has pixels to score
    assert num_chosen_patches(64, 0.0) == 0
    assert not tamim_pixel_masks(56, 56, mask_ratio=0.0).scored.any()
    assert int(tamim_pixel_masks(56, 56, mask_ratio=1.0, keep_ratio=0.0).replaced.sum()) == 56 * 56


def _captions():
    # [bos] tokens [eos] [pad…]; pad id == eos id as in CLIP
    ids = torch.tensor(
        [
            [CLIP_BOS, 10, 11, 12, 13, 14, 15, 16, 17, CLIP_EOS],
            [CLIP_BOS, 20, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS],
            [CLIP_BOS, 30, 31, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS],
            [CLIP_BOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS, CLIP_EOS],
        ]
    )
    lengths = torch.tensor([10, 3, 4, 2])
    attention = (torch.arange(10)[None] < lengths[:, None]).long()
    special = ((ids == CLIP_BOS) | (ids == CLIP_EOS)).long() * attention
    return ids, attention, special


def test_special_and_pad_tokens_never_masked_and_every_caption_gets_one():
    ids, attention, special = _captions()
    eligible = attention.bool() & ~special.bool()
    for seed in range(50):
        masked, labels = mask_caption_tokens(
            ids,
            CLIP_EOS,
            attention_mask=attention,
            special_tokens_mask=special,
            keep_ratio=0.0,
            generator=torch.Generator().manual_seed(seed),
        )
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~eligible).any()
        assert torch.equal(masked[~chosen], ids[~chosen])
        assert torch.all(masked[chosen] == CLIP_EOS)
        assert torch.equal(labels[chosen], ids[chosen])
        assert chosen[:3].any(dim=1).all()  # non-empty captions: at least one target for eq. 4
        assert not chosen[3].any()  # "[bos][eos]" has nothing to mask


def test_special_token_ids_alone_and_required_argument():
    ids, attention, _ = _captions()
    masked, labels = mask_caption_tokens(
        ids,
        CLIP_EOS,
        attention_mask=attention,
        special_token_ids=[CLIP_BOS, CLIP_EOS],
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.isin(ids[labels != IGNORE_INDEX], torch.tensor([CLIP_BOS, CLIP_EOS])).any()
    with pytest.raises(ValueError, match="special"):
        mask_caption_tokens(ids, CLIP_EOS, attention_mask=attention)


def test_token_mask_ratio_is_fifteen_percent_and_seeded():
    ids = torch.randint(100, 1000, (512, 64))
    special = torch.zeros_like(ids)
    _, labels = mask_caption_tokens(ids, 0, special_tokens_mask=special, generator=torch.Generator().manual_seed(0))
    ratio = (labels != IGNORE_INDEX).float().mean().item()
    assert 0.14 < ratio < 0.16
    _, again = mask_caption_tokens(ids, 0, special_tokens_mask=special, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, again)


def test_release_keeps_a_fifth_of_chosen_tokens_unchanged_but_scores_them():
    ids = torch.randint(100, 1000, (512, 64))
    special = torch.zeros_like(ids)
    generator = torch.Generator().manual_seed(5)
    masked, labels = mask_caption_tokens(ids, CLIP_EOS, special_tokens_mask=special, generator=generator)
    chosen = labels != IGNORE_INDEX
    replaced = masked != ids
    assert torch.all(masked[replaced] == CLIP_EOS)  # end-of-text, never a random token
    assert not (replaced & ~chosen).any()
    assert torch.equal(labels[chosen], ids[chosen])  # unchanged chosen tokens are scored too
    kept_share = (chosen & ~replaced).sum().item() / chosen.sum().item()
    assert 0.17 < kept_share < 0.23
    plain, plain_labels = mask_caption_tokens(
        ids, CLIP_EOS, special_tokens_mask=special, keep_ratio=0.0, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(plain != ids, plain_labels != IGNORE_INDEX)  # keep_ratio=0: every chosen token replaced
