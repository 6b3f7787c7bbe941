"""The authors' release conventions where the paper is silent (README, "Conventions and where we differ from the
release"): each default below is the release's, and each switch restores the other behaviour."""

import pytest
import torch
from torch import nn

from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration
from processing_vikdf import IGNORE_INDEX
from vikdf.data.collators import PretrainCollator
from vikdf.testing import tiny_vikdf_config
from vikdf.training.losses import tamim_loss
from vikdf.training.masking import apply_pixel_mask
from vikdf.training.trainers import LOSS_ONLY_INPUTS, OBJECTIVE_TABLE, count_items

LONG_CAPTION = " ".join(["a dog playing in the park with a red ball"] * 40)


def test_paper_config_defaults_are_the_releases():
    config = VIKDFConfig()
    assert (config.mask_patch_size, config.mask_ratio, config.mask_keep_ratio) == (28, 0.6, 0.2)
    assert (config.text_mask_ratio, config.text_mask_keep_ratio) == (0.15, 0.2)
    assert config.vision_post_layernorm is False
    assert (config.head_num_attention_heads, config.head_hidden_act, config.head_dropout) == (4, "relu", 0.1)
    assert config.head_intermediate_size == 4 * config.clip_config.projection_dim
    assert (config.caption_max_length, config.caption_loss_on_eos) == (256, False)
    with pytest.raises(ValueError, match="head_hidden_act"):
        VIKDFConfig(head_hidden_act="swishy")


def _examples(count: int = 4, caption: str = "a photo of a dog playing in the park") -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "caption": caption} for _ in range(count)]


def test_collator_scores_every_chosen_patch_and_replaces_most_of_their_sub_patches(build_tiny):
    model, processor = build_tiny()
    batch = PretrainCollator(processor, model.config)(_examples(16))
    scored, replaced = batch["pixel_mask"], batch["pixel_replaced_mask"]
    # tiny: 32-px images in 8-px patches (a 4×4 grid): ⌈0.6·16⌉ = 10 chosen, scored whole
    assert torch.all(scored.sum(dim=(1, 2)) == 10 * 8 * 8)
    assert not (replaced & ~scored).any() and (scored & ~replaced).any()
    # the vision patch (4 px) is the unit left unchanged
    cells = replaced.reshape(16, 8, 4, 8, 4)
    assert torch.all(cells.all(dim=(2, 4)) | ~cells.any(dim=(2, 4)))
    chosen = batch["clip_mlm_labels"] != IGNORE_INDEX
    assert not ((batch["clip_masked_input_ids"] != batch["clip_input_ids"]) & ~chosen).any()


def test_plain_switches_replace_exactly_the_scored_set(build_tiny):
    model, processor = build_tiny(mask_keep_ratio=0.0, text_mask_keep_ratio=0.0)
    batch = PretrainCollator(processor, model.config)(_examples(8))
    assert torch.equal(batch["pixel_mask"], batch["pixel_replaced_mask"])
    replaced = batch["clip_masked_input_ids"] != batch["clip_input_ids"]
    assert torch.equal(replaced, batch["clip_mlm_labels"] != IGNORE_INDEX)


def test_tamim_objective_sees_the_replaced_image_and_scores_every_chosen_pixel(build_tiny):
    model, processor = build_tiny()
    model.eval()
    batch = PretrainCollator(processor, model.config)(_examples())
    with torch.no_grad():
        outputs = model(**{key: value for key, value in batch.items() if key not in LOSS_ONLY_INPUTS})
        tamim_sum = next(o for o in OBJECTIVE_TABLE if o.name == "tamim").loss(outputs, batch, None)
        text_knowledge = model.get_text_knowledge(batch["clip_input_ids"], batch["clip_attention_mask"])
        masked = apply_pixel_mask(batch["pixel_values"], batch["pixel_replaced_mask"])
        rebuilt = model.reconstruct_image(model.encode_image(masked), text_knowledge)
        expected = (rebuilt - batch["pixel_values"]).abs()[batch["pixel_mask"].unsqueeze(1).expand_as(rebuilt)].mean()
    tamim = tamim_sum / count_items(batch, model.config.num_query_tokens)["tamim"]
    torch.testing.assert_close(tamim, expected)
    torch.testing.assert_close(tamim_loss(rebuilt, batch["pixel_values"], batch["pixel_mask"]), expected)


def test_vision_states_are_the_raw_last_hidden_state_unless_switched(build_tiny):
    model, _ = build_tiny()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = model.vision_encoder(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(model.encode_image(pixels), model.visual_projection(raw))
        model.config.vision_post_layernorm = True
        normed = model.visual_projection(model.vision_encoder.post_layernorm(raw))
        torch.testing.assert_close(model.encode_image(pixels), normed)
    assert not torch.allclose(normed, model.visual_projection(raw))


def test_knowledge_blocks_are_the_releases_post_norm_relu_blocks_with_dropout():
    config = tiny_vikdf_config(head_dropout=0.1, head_intermediate_size=128)
    model = VIKDFForConditionalGeneration(config)
    block = model.tamim_block
    assert block.attention.num_heads == 4 and block.attention.dropout == 0.1
    assert isinstance(block.feed_forward[1], nn.ReLU) and block.dropout.p == 0.1
    states, knowledge = torch.randn(2, 5, 32), torch.randn(2, 8, 32)
    block.eval()
    with torch.no_grad():
        attended = block.attention(states, knowledge, knowledge, need_weights=False)[0]
        hidden = block.attention_norm(states + attended)
        expected = block.feed_forward_norm(hidden + block.feed_forward[2](torch.relu(block.feed_forward[0](hidden))))
        torch.testing.assert_close(block(states, knowledge), expected)
        block.train()
        torch.manual_seed(0)
        first = block(states, knowledge)
        assert not torch.allclose(first, block(states, knowledge))  # dropout is active in training
    # the tiny test models keep no dropout through their own override
    assert tiny_vikdf_config().head_dropout == 0.0


def test_long_captions_keep_their_start_for_clip_and_are_cut_for_the_llm(build_tiny):
    model, processor = build_tiny(caption_max_length=12)
    batch = PretrainCollator(processor, model.config)(_examples(2, LONG_CAPTION))
    clip_tokenizer = processor.clip_tokenizer
    start = clip_tokenizer(LONG_CAPTION, add_special_tokens=False)["input_ids"][:75]
    assert batch["clip_input_ids"][0].tolist() == [clip_tokenizer.bos_token_id, *start, clip_tokenizer.eos_token_id]
    images = batch["pixel_values"].shape[0]
    labels = batch["llm_labels"][0]
    caption_ids = labels[labels != IGNORE_INDEX]
    assert len(caption_ids) == 12
    assert LONG_CAPTION.startswith(processor.tokenizer.decode(caption_ids).strip())
    iakr_row = batch["llm_input_ids"][images][batch["llm_attention_mask"][images].bool()]
    text = iakr_row[: -model.config.num_query_tokens]
    assert text[-12:].tolist() == caption_ids.tolist()  # the same 12 caption tokens, then the slots


def test_caption_end_of_sequence_is_scored_only_when_switched_on(build_tiny):
    for switch in (False, True):
        model, processor = build_tiny(caption_loss_on_eos=switch)
        eos = processor.tokenizer.eos_token_id
        batch = PretrainCollator(processor, model.config)(_examples(2))
        iaci_labels = batch["llm_labels"][:2]
        assert bool((iaci_labels == eos).any()) is switch
        assert bool((batch["llm_input_ids"][:2] == eos).any())  # the token is in the row either way
