"""The LM head runs only where a loss reads it (`logits_positions`); the losses equal the full-logits ones to 1e-6."""

import pytest
import torch
from pretrain_helpers import disable_dropout, load_pairs

from vikdf.data.collators import DialogueCollator, PretrainCollator
from vikdf.training.losses import iaci_loss, iakr_loss, next_token_positions
from vikdf.training.trainers import LOSS_ONLY_INPUTS, OBJECTIVE_TABLE

DIALOGUES = [
    (["i saw a zorp at the park today."], "was it red?"),
    (["what did you cook tonight?", "a big pot of soup!"], "that sounds warm and good."),
    (["hello there."], "hi."),
]


def full_logits_language_losses(model, batch, text_knowledge) -> dict[str, torch.Tensor]:
    """IACI and IAKR sums as computed before `logits_positions`: the LM head over every position of every row."""
    images = text_knowledge.shape[0]
    ids = batch["llm_input_ids"]
    outputs = model(
        input_ids=ids, attention_mask=batch["llm_attention_mask"], knowledge=text_knowledge.repeat(2, 1, 1),
        output_hidden_states=True, use_cache=False,
    )
    reconstructed = model.reconstruct_knowledge(outputs.hidden_states[-1][images:], ids[images:])
    return {
        "iaci": iaci_loss(outputs.logits[:images], batch["llm_labels"][:images], reduction="sum"),
        "iakr": iakr_loss(reconstructed, text_knowledge, reduction="sum"),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pretraining_losses_equal_the_full_logits_ones(build_tiny, pair_world, family):
    model, processor = build_tiny(family)
    disable_dropout(model)
    batch = PretrainCollator(processor, model.config, seed=0)(load_pairs(pair_world, 4))
    with torch.no_grad():
        outputs = model(**{key: value for key, value in batch.items() if key not in LOSS_ONLY_INPUTS})
        losses = {objective.name: objective.loss(outputs, batch, None) for objective in OBJECTIVE_TABLE
                  if objective.name in ("iaci", "iakr")}  # the two that read no process group
        text_knowledge = model.get_text_knowledge(batch["clip_input_ids"], batch["clip_attention_mask"])
        reference = full_logits_language_losses(model, batch, text_knowledge)
    for name, value in reference.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-6), name


def dialogue_inputs(processor) -> dict[str, torch.Tensor]:
    return DialogueCollator(processor)([{"context": c, "response": r} for c, r in DIALOGUES])


@pytest.mark.parametrize("num_items_in_batch", [None, torch.tensor(40)])
def test_response_loss_and_logits_equal_the_llm_own(build_tiny, num_items_in_batch):
    model, processor = build_tiny("llama")
    model.eval()
    inputs = dialogue_inputs(processor)
    positions = next_token_positions(inputs["labels"])
    assert positions.any(-1).all() and not positions.all()
    with torch.no_grad():
        full = model(**inputs, num_items_in_batch=num_items_in_batch)
        selected = model(**inputs, logits_positions=positions, num_items_in_batch=num_items_in_batch)
    assert selected.logits.shape == (positions.sum().item(), full.logits.shape[-1])
    torch.testing.assert_close(selected.logits, full.logits[positions], rtol=1e-6, atol=1e-6)
    assert selected.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)


def test_knowledge_positions_are_the_slots_in_order(build_tiny):
    model, processor = build_tiny("llama")
    inputs = processor(text=[c for c, _ in DIALOGUES])  # left padded: the slots sit at different columns per row
    ids = inputs["input_ids"]
    slots = (ids == model.config.knowledge_token_id).nonzero()[:, 1].view(len(DIALOGUES), -1)
    assert len(set(slots[:, 0].tolist())) > 1
    assert torch.equal(model.knowledge_positions(ids), slots)
