"""The objective table (`vikdf.training.trainers.OBJECTIVE_TABLE`), the model's parts of each objective
(`modeling_vikdf.OBJECTIVE_PARTS`), the trainable-part lists derived from them and the config's switches and
weights agree: adding an objective in one place and not the others fails here."""

import dataclasses

from configuration_vikdf import LOSS_WEIGHTS, VIKDFConfig
from modeling_vikdf import (
    DIALOGUE_TRAINABLE,
    OBJECTIVE_PARTS,
    PRETRAIN_TRAINABLE,
    PRETRAINING_ONLY,
    VIKDFForConditionalGeneration,
    VIKDFPretrainingOutput,
    enabled_objectives,
)
from vikdf.testing import tiny_vikdf_config
from vikdf.training.trainers import LOGGED_LOSSES, OBJECTIVE_TABLE, OBJECTIVES


def test_the_table_and_the_models_parts_name_the_same_objectives_in_order():
    assert OBJECTIVES == tuple(OBJECTIVE_PARTS)
    assert LOGGED_LOSSES == ("loss_tim", "loss_tamim", "loss_iamtm", "loss_iaci", "loss_iakr")


def test_every_weight_and_switch_is_a_config_field_and_every_config_switch_has_an_objective():
    fields = set(vars(VIKDFConfig()))
    assert tuple(objective.weight for objective in OBJECTIVE_TABLE) == LOSS_WEIGHTS
    switches = {switch for switch, _ in OBJECTIVE_PARTS.values() if switch is not None}
    assert switches <= fields
    assert switches == {name for name in fields if name.startswith("use_") and name != "use_qformer_text_input"}


def test_the_trainable_lists_hold_every_objectives_heads_and_the_model_builds_them():
    model = VIKDFForConditionalGeneration(tiny_vikdf_config())
    top_level = {name for name, _ in model.named_children()}
    top_level |= {name for name, _ in model.named_parameters(recurse=False)}
    for name, (_, heads) in OBJECTIVE_PARTS.items():
        for head in heads:
            assert head in PRETRAIN_TRAINABLE and head in PRETRAINING_ONLY, (name, head)
            assert head not in DIALOGUE_TRAINABLE, (name, head)
            assert head in top_level, (name, head)
    heads = {head for _, parts in OBJECTIVE_PARTS.values() for head in parts}
    # What trains in pre-training beyond dialogue is exactly the objectives' heads.
    assert set(PRETRAIN_TRAINABLE) - set(DIALOGUE_TRAINABLE) == heads
    assert set(PRETRAINING_ONLY) - {"vision_encoder", "visual_projection"} == heads


def test_each_switch_turns_off_its_objective_and_its_output_fields():
    output_fields = {field.name for field in dataclasses.fields(VIKDFPretrainingOutput)}
    for name in OBJECTIVES:
        assert any(field.startswith(name) for field in output_fields), name
    for name, (switch, _) in OBJECTIVE_PARTS.items():
        if switch is None:
            continue
        assert enabled_objectives(tiny_vikdf_config(**{switch: False})) == tuple(o for o in OBJECTIVES if o != name)
