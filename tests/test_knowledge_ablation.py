"""The causal check of the knowledge (`--knowledge_ablation zero|shuffle`, `vikdf.evaluation.knowledge_ablation`)."""

import json

import pytest
import torch

import eval_dialogue
from vikdf.evaluation.dialogues import generate_responses, response_nll
from vikdf.evaluation.knowledge_ablation import _derangement, knowledge_ablation

CONTEXTS = [["i saw a zorp at the park today."], ["hi! what have you been up to?", "my neighbour just got a fep."],
            ["a plonk was sitting on the bus seat next to me."], ["we spotted a trobe on our hike yesterday."]]
RESPONSES = ["was it red?", "oh, green as always?", "bright blue, as you would expect.", "the orange ones."]
GREEDY = dict(num_beams=1, max_new_tokens=6, no_repeat_ngram_size=0)


def loud_knowledge_model(build_tiny):
    """A tiny VIKDF whose `K` follows the context and whose soft prompts dominate the LLM's input.

    At initialisation the queries are zeros and the cross-attention small, so `K` barely depends on the context;
    random queries and a ten times stronger cross-attention make it do so."""
    model, processor = build_tiny()
    with torch.no_grad():
        model.query_tokens.normal_(generator=torch.Generator().manual_seed(0))
        for name, parameter in model.iq_former.named_parameters():
            if "crossattention" in name and name.endswith("weight") and "LayerNorm" not in name:
                parameter.mul_(10.0)
        model.language_projection.weight.mul_(50.0)
    return model.eval(), processor


def test_derangement_moves_every_row():
    generator = torch.Generator().manual_seed(0)
    for size in (2, 3, 7, 24):
        permutation = _derangement(size, generator)
        assert sorted(permutation.tolist()) == list(range(size))
        assert (permutation != torch.arange(size)).all()


def test_shuffled_knowledge_changes_outputs_of_a_context_dependent_model(build_tiny):
    model, processor = loud_knowledge_model(build_tiny)
    ci = processor.clip_text_inputs(CONTEXTS)
    knowledge = model.get_text_knowledge(ci["clip_input_ids"], ci["clip_attention_mask"])
    assert (knowledge[0] - knowledge[1]).abs().max() > 0.5  # K depends on the context
    plain = generate_responses(model, processor, CONTEXTS, batch_size=4, progress=False, **GREEDY)
    with knowledge_ablation(model, "shuffle", seed=0):
        shuffled = generate_responses(model, processor, CONTEXTS, batch_size=4, progress=False, **GREEDY)
        nll_shuffled = response_nll(model, processor, CONTEXTS, RESPONSES, batch_size=4)
    assert shuffled != plain
    assert nll_shuffled != response_nll(model, processor, CONTEXTS, RESPONSES, batch_size=4)
    # The hook is gone after the block.
    assert generate_responses(model, processor, CONTEXTS, batch_size=4, progress=False, **GREEDY) == plain


def test_zero_knowledge_equals_a_language_projection_that_outputs_zeros(build_tiny):
    model, processor = loud_knowledge_model(build_tiny)
    with knowledge_ablation(model, "zero"):
        ablated = generate_responses(model, processor, CONTEXTS, batch_size=4, progress=False, **GREEDY)
        nll_ablated, _ = response_nll(model, processor, CONTEXTS, RESPONSES, batch_size=4)
    plain = generate_responses(model, processor, CONTEXTS, batch_size=4, progress=False, **GREEDY)
    with torch.no_grad():
        model.language_projection.weight.zero_()
        model.language_projection.bias.zero_()
    assert ablated != plain
    assert ablated == generate_responses(model, processor, CONTEXTS, batch_size=4, progress=False, **GREEDY)
    assert nll_ablated == pytest.approx(response_nll(model, processor, CONTEXTS, RESPONSES, batch_size=4)[0])


def test_eval_dialogue_flag_evaluates_with_ablated_knowledge(build_tiny, tmp_path):
    model, processor = loud_knowledge_model(build_tiny)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps([{"context": c, "response": r} for c, r in zip(CONTEXTS, RESPONSES)]))
    common = ["--model_name_or_path", str(tmp_path / "ckpt"), "--test_file", str(test_file), "--batch_size", "4",
              "--num_beams", "1", "--max_new_tokens", "6", "--disable_tqdm", "true", "--skip_perplexity", "true"]
    hypotheses = {}
    for mode in ("none", "shuffle"):
        eval_dialogue.main([*common, "--output_dir", str(tmp_path / mode), "--knowledge_ablation", mode])
        lines = (tmp_path / mode / "predictions.jsonl").read_text().splitlines()
        hypotheses[mode] = [json.loads(line)["hypothesis"] for line in lines]
        assert json.loads((tmp_path / mode / "eval_info.json").read_text())["knowledge_ablation"] == mode
    assert hypotheses["shuffle"] != hypotheses["none"]
    with pytest.raises(ValueError, match="--knowledge_ablation zero needs a VIKDF evaluation"):
        eval_dialogue.main([*common, "--output_dir", str(tmp_path / "x"), "--knowledge_ablation", "zero",
                            "--baseline", "llm"])
