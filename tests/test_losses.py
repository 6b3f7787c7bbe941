"""The five VIKDF objectives (vikdf/training/losses.py) against small cases computed by hand with plain Python math."""

import math

import pytest
import torch
import torch.nn.functional as F

from vikdf.training.losses import IGNORE_INDEX, iaci_loss, iakr_loss, iamtm_loss, tamim_loss, tim_loss, tim_similarity


def _rows(tensor: torch.Tensor) -> list[list[float]]:
    return [[float(x) for x in row] for row in tensor]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _nll(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], written out."""
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def _hand_infonce(similarity: list[list[float]], scale: float) -> float:
    """Symmetric InfoNCE of eq. 2 on a square similarity matrix: mean over pairs and both directions."""
    n = len(similarity)
    text_to_image = sum(_nll([scale * s for s in similarity[i]], i) for i in range(n)) / n
    image_to_text = sum(_nll([scale * similarity[i][j] for i in range(n)], j) for j in range(n)) / n
    return (text_to_image + image_to_text) / 2


# --------------------------------------------------------------------------------------------------- TIM


def test_tim_first_pooling_three_pairs_by_hand():
    text = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, -0.4, 1.0]]), dim=-1)
    image = F.normalize(torch.tensor([[0.9, 0.0, 0.3], [0.5, 1.0, 0.0], [0.2, 0.3, -1.0]]), dim=-1)
    temperature = 0.5
    logit_scale = torch.tensor(math.log(1 / temperature))

    t, i = _rows(text), _rows(image)
    similarity = [[_dot(t[a], i[b]) for b in range(3)] for a in range(3)]
    assert torch.allclose(tim_similarity(text, image), torch.tensor(similarity), atol=1e-6)
    # An asymmetric case: the two directions really differ, so a loss that dropped one of them would be caught.
    expected = _hand_infonce(similarity, 1 / temperature)
    one_direction = sum(_nll([2 * s for s in similarity[a]], a) for a in range(3)) / 3
    assert abs(expected - one_direction) > 1e-3
    assert tim_loss(text, image, logit_scale).item() == pytest.approx(expected, rel=1e-5)


def test_tim_max_pooling_over_queries_by_hand():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(3, 4), dim=-1)
    image = F.normalize(torch.randn(3, 2, 4), dim=-1)  # two query embeddings per image
    t, queries = _rows(text), [_rows(q) for q in image]
    similarity = [[max(_dot(t[a], q) for q in queries[b]) for b in range(3)] for a in range(3)]

    assert torch.allclose(tim_similarity(text, image), torch.tensor(similarity), atol=1e-6)
    # Not the first query alone: the max over queries picks the second one somewhere in this case.
    first_only = [[_dot(t[a], queries[b][0]) for b in range(3)] for a in range(3)]
    assert max(abs(a - b) for r, q in zip(first_only, similarity) for a, b in zip(r, q)) > 0.1
    assert tim_loss(text, image, torch.tensor(math.log(10.0))).item() == pytest.approx(
        _hand_infonce(similarity, 10.0), rel=1e-5
    )


def test_tim_temperature_is_clamped_at_one_hundredth():
    torch.manual_seed(1)
    text, image = F.normalize(torch.randn(3, 5), dim=-1), F.normalize(torch.randn(3, 5), dim=-1)
    similarity = [[_dot(a, b) for b in _rows(image)] for a in _rows(text)]
    clamped = tim_loss(text, image, torch.tensor(math.log(1000.0))).item()
    assert clamped == pytest.approx(_hand_infonce(similarity, 100.0), rel=1e-5)


@pytest.mark.parametrize("pooling", ["first", "max"])
def test_tim_embeddings_of_the_model_are_normalised_and_pooled(build_tiny, pooling):
    model, _ = build_tiny(tim_pooling=pooling)
    torch.manual_seed(0)
    text_knowledge, image_knowledge = torch.randn(3, 8, 32), torch.randn(3, 8, 32)
    text, image = model.tim_embeddings(text_knowledge, image_knowledge)
    assert text.shape == (3, 16)
    assert image.shape == ((3, 16) if pooling == "first" else (3, 8, 16))
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(image.norm(dim=-1), torch.ones(image.shape[:-1]), atol=1e-5)
    # The text side is query 0 only: changing the other queries changes nothing.
    changed = text_knowledge.clone()
    changed[:, 1:] += 5.0
    assert torch.equal(model.tim_embeddings(changed, image_knowledge)[0], text)


# --------------------------------------------------------------------------------------------------- TAMIM


def test_tamim_is_l1_on_masked_pixels_only():
    torch.manual_seed(0)
    pixels, reconstruction = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # 4 masked pixels in image 0
    mask[1, 3, :] = True  # 4 masked pixels in image 1

    errors = [
        abs(float(reconstruction[b, c, y, x]) - float(pixels[b, c, y, x]))
        for b in range(2) for c in range(3) for y in range(4) for x in range(4) if mask[b, y, x]
    ]
    assert len(errors) == 24  # N_i of eq. 3 counts every channel of a masked pixel
    loss = tamim_loss(reconstruction, pixels, mask)
    assert loss.item() == pytest.approx(sum(errors) / len(errors), rel=1e-6)
    assert tamim_loss(reconstruction, pixels, mask.unsqueeze(1)).item() == pytest.approx(loss.item(), rel=1e-6)

    # Unmasked pixels do not count, in the reconstruction or in the original.
    other_reconstruction, other_pixels = reconstruction.clone(), pixels.clone()
    unmasked = ~mask.unsqueeze(1).expand_as(pixels)
    other_reconstruction[unmasked] = 100.0
    other_pixels[unmasked] = -100.0
    assert tamim_loss(other_reconstruction, other_pixels, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    # ...while a change on one masked pixel does.
    other_reconstruction[0, 0, 0, 0] += 1.0
    assert tamim_loss(other_reconstruction, other_pixels, mask).item() != pytest.approx(loss.item(), rel=1e-6)

    assert tamim_loss(reconstruction, pixels, mask, reduction="sum").item() == pytest.approx(sum(errors), rel=1e-6)


# --------------------------------------------------------------------------------------------------- IAMTM


def test_iamtm_is_cross_entropy_on_masked_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[0, 3], labels[1, 4] = 2, 6, 0
    masked = [(0, 1), (0, 3), (1, 4)]
    expected = [_nll([float(v) for v in logits[b, p]], int(labels[b, p])) for b, p in masked]

    loss = iamtm_loss(logits, labels)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert iamtm_loss(logits, labels, reduction="sum").item() == pytest.approx(sum(expected), rel=1e-6)
    assert iamtm_loss(logits, labels, reduction="sum").item() == pytest.approx(3 * loss.item(), rel=1e-6)
    # The trainer passes the masked positions' logits only, (M, V) with labels (M,): the same loss.
    selected = labels != IGNORE_INDEX
    assert iamtm_loss(logits[selected], labels[selected]).item() == pytest.approx(loss.item(), rel=1e-6)

    other = logits.clone()
    other[labels == IGNORE_INDEX] = torch.randn(int((labels == IGNORE_INDEX).sum()), 7) * 10
    assert iamtm_loss(other, labels).item() == pytest.approx(loss.item(), rel=1e-6)


def test_empty_selection_gives_zero_not_nan():
    labels = torch.full((2, 4), IGNORE_INDEX)
    assert iamtm_loss(torch.randn(2, 4, 5), labels).item() == 0.0
    nothing_masked = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert tamim_loss(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2), nothing_masked).item() == 0
    with pytest.raises(ValueError, match="reduction"):
        iamtm_loss(torch.randn(2, 4, 5), labels, reduction="none")


# --------------------------------------------------------------------------------------------------- IACI


def test_iaci_shifts_labels_within_each_row():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3)
    # Row 0: prompt, prompt, caption token 2, eos 0 -> predicted from positions 1 and 2.
    # Row 1: a label at position 0 has no previous position and can never be a target.
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 0], [1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    row = lambda b, p: [float(v) for v in logits[b, p]]  # noqa: E731
    expected = [_nll(row(0, 1), 2), _nll(row(0, 2), 0), _nll(row(1, 0), 2)]

    loss = iaci_loss(logits, labels)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert iaci_loss(logits, labels, reduction="sum").item() == pytest.approx(3 * loss.item(), rel=1e-6)

    # The last position's logits predict nothing, nor do positions before an ignored label.
    other = logits.clone()
    other[:, -1] = 50.0
    other[0, 0] = -50.0
    other[1, 1:] = 50.0
    assert iaci_loss(other, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    # An unshifted loss would differ on this case.
    unshifted = F.cross_entropy(logits[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX]).item()
    assert unshifted != pytest.approx(loss.item(), rel=1e-3)


# --------------------------------------------------------------------------------------------------- IAKR


def test_iakr_reads_the_state_before_each_knowledge_slot(build_tiny):
    model, processor = build_tiny()
    n, knowledge_id = model.config.num_query_tokens, model.config.knowledge_token_id
    assert n == 8
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    # Row 0: three text tokens, the 8 slots, one pad. Row 1: one text token, the 8 slots, three pads.
    input_ids = torch.tensor([[5, 6, 7] + [knowledge_id] * n + [pad], [9] + [knowledge_id] * n + [pad] * 3])
    seq, width = input_ids.shape[1], model.config.text_config.hidden_size
    # Distinctive states: every (row, position) gets its own random vector.
    torch.manual_seed(0)
    hidden = torch.randn(2, seq, width)

    first_slot = [3, 1]
    expected_positions = [[first_slot[b] - 1 + k for k in range(n)] for b in range(2)]
    assert model.knowledge_positions(input_ids).tolist() == [[p + 1 for p in row] for row in expected_positions]

    with torch.no_grad():
        reconstructed = model.reconstruct_knowledge(hidden, input_ids)
        for b in range(2):
            for k, position in enumerate(expected_positions[b]):
                assert torch.allclose(reconstructed[b, k], model.iakr_head(hidden[b, position]), atol=1e-6)
        # A state at a slot position (rather than the one before) would change the answer.
        assert not torch.allclose(reconstructed[0, 0], model.iakr_head(hidden[0, 3]), atol=1e-3)

    knowledge = torch.randn(2, n, model.config.qformer_config.hidden_size)
    squared = [
        (float(reconstructed[b, k, d]) - float(knowledge[b, k, d])) ** 2
        for b in range(2) for k in range(n) for d in range(knowledge.shape[-1])
    ]
    loss = iakr_loss(reconstructed, knowledge)
    assert loss.item() == pytest.approx(sum(squared) / len(squared), rel=1e-5)
    # reduction="sum" adds the per-slot means: mean × (images × slots), the count the trainer divides by.
    assert iakr_loss(reconstructed, knowledge, reduction="sum").item() == pytest.approx(2 * n * loss.item(), rel=1e-5)


def test_iakr_layout_of_the_processor_puts_the_last_caption_token_before_the_first_slot(build_tiny):
    model, processor = build_tiny()
    captions = ["a dog", "two people are sitting at a table in a restaurant"]
    rows = processor.reconstruction_inputs(captions, ["Picture this:", "Picture this:"])
    positions = model.knowledge_positions(rows["input_ids"])
    for b, caption in enumerate(captions):
        before = int(positions[b, 0]) - 1
        assert rows["attention_mask"][b, before] == 1
        # The state before slot 1 has read the whole caption: its last token sits there.
        text_ids = processor.tokenizer(f"Picture this: {caption}", add_special_tokens=False)["input_ids"]
        assert rows["input_ids"][b, before].item() == text_ids[-1]
        # Slots are contiguous: slot k+1 follows slot k.
        assert torch.equal(positions[b], positions[b, 0] + torch.arange(model.config.num_query_tokens))
