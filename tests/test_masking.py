"""TAMIM pixel masks and IAMTM caption-token masks (vikdf/masking.py; paper eq. 3–4, §4.2)."""

import pytest
import torch

from vikdf.masking import (
    IGNORE_INDEX,
    apply_pixel_mask,
    mask_caption_tokens,
    mask_images,
    num_masked_patches,
    tamim_pixel_mask,
)

CLIP_BOS, CLIP_EOS = 49406, 49407  # CLIP's pad id is its end-of-text id too


def _patch_grid(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(…, H, W) pixel mask → (…, H/p, W/p, p·p) values of each patch."""
    *lead, h, w = mask.shape
    grid = mask.reshape(*lead, h // patch, patch, w // patch, patch).movedim(-3, -2)
    return grid.reshape(*lead, h // patch, w // patch, patch * patch)


def test_paper_setting_masks_exactly_31_of_64_patches():
    # §4.2: 28×28 patches at ratio 0.6 on 224 (8×8 grid); the release leaves 20 % of the chosen unmasked
    assert num_masked_patches(64, 0.6, 0.2) == 31
    mask = tamim_pixel_mask(224, 224, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (224, 224) and mask.dtype == torch.bool
    patches = _patch_grid(mask, 28)
    # every patch is wholly masked or wholly kept
    assert torch.all(patches.all(-1) | ~patches.any(-1))
    assert int(patches.all(-1).sum()) == 31
    assert int(mask.sum()) == 31 * 28 * 28


def test_batched_masks_are_independent_exact_and_seeded():
    masks = tamim_pixel_mask(224, 224, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert masks.shape == (16, 224, 224)
    assert torch.all(_patch_grid(masks, 28).all(-1).sum(dim=(1, 2)) == 31)
    assert len({tuple(m[::28, ::28].flatten().tolist()) for m in masks}) > 1
    again = tamim_pixel_mask(224, 224, batch_size=16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masks, again)
    other = tamim_pixel_mask(224, 224, batch_size=16, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(masks, other)


def test_masked_pixels_are_zero_and_others_unchanged():
    images = torch.randn(4, 3, 224, 224)
    masked, mask = mask_images(images, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (4, 224, 224)
    channel_mask = mask.unsqueeze(1).expand_as(images)
    assert torch.all(masked[channel_mask] == 0)
    assert torch.equal(masked[~channel_mask], images[~channel_mask])
    assert torch.equal(images, images.clone())  # input untouched
    single = apply_pixel_mask(images[0], mask[0])
    assert torch.equal(single, masked[0])


def test_mask_edge_cases():
    with pytest.raises(ValueError, match="multiple of the mask patch size"):
        tamim_pixel_mask(224, 224, patch_size=30)
    assert num_masked_patches(4, 0.1, 0.2) == 1  # eq. 3 needs at least one masked pixel
    assert num_masked_patches(64, 0.0, 0.2) == 0
    assert not tamim_pixel_mask(56, 56, mask_ratio=0.0).any()
    assert int(tamim_pixel_mask(56, 56, mask_ratio=1.0, keep_ratio=0.0).sum()) == 56 * 56


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
