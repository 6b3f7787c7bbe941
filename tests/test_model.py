"""The VIKDF model, processor and component loading (issue: HF-native remote-code model)."""

import json
import textwrap

import pytest
import torch
from conftest import run_outside_the_checkout
from safetensors.torch import load_file, save_file
from transformers import BertModel, CLIPModel

from configuration_vikdf import VIKDFConfig
from modeling_vikdf import DIALOGUE_TRAINABLE, PRETRAIN_TRAINABLE, VIKDFForConditionalGeneration
from vikdf.testing import LLM_FAMILIES, tiny_vikdf_config

CONTEXTS = [
    ["hello there", "what did you see at the park today?"],
    "a dog in the park",
    ["i love the beach", "the weather is sunny", "shall we go swimming tomorrow morning?"],
    "hi",
]


def top_level_trainable(model) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("llm_family", LLM_FAMILIES)
def test_build_from_component_folders(build_tiny, tiny_components, llm_family):
    model, processor = build_tiny(llm_family)
    paths = tiny_components(llm_family)

    bert = BertModel.from_pretrained(paths.bert).state_dict()
    iq = model.iq_former.state_dict()
    for layer in range(model.config.qformer_config.num_hidden_layers):
        bert_layer, iq_layer = f"encoder.layer.{layer}.", f"encoder.layer.{layer}."
        pairs = {
            "attention.self.query.weight": "attention.attention.query.weight",
            "attention.self.value.bias": "attention.attention.value.bias",
            "attention.output.LayerNorm.weight": "attention.output.LayerNorm.weight",
            "intermediate.dense.weight": "intermediate_query.dense.weight",
            "output.dense.weight": "output_query.dense.weight",
            "output.LayerNorm.bias": "output_query.LayerNorm.bias",
        }
        for bert_key, iq_key in pairs.items():
            torch.testing.assert_close(iq[iq_layer + iq_key], bert[bert_layer + bert_key], rtol=0, atol=0)
    torch.testing.assert_close(iq["layernorm.weight"], bert["embeddings.LayerNorm.weight"], rtol=0, atol=0)

    clip = CLIPModel.from_pretrained(paths.clip)
    torch.testing.assert_close(model.text_projection.weight, clip.text_projection.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        model.vision_encoder.embeddings.patch_embedding.weight,
        clip.vision_model.embeddings.patch_embedding.weight,
        rtol=0,
        atol=0,
    )

    for part in (model.text_encoder, model.vision_encoder, model.text_projection, model.visual_projection, model.language_model):
        assert not any(p.requires_grad for p in part.parameters())
    assert top_level_trainable(model) == set(PRETRAIN_TRAINABLE)
    model.set_trainable_stage("dialogue")
    assert top_level_trainable(model) == set(DIALOGUE_TRAINABLE)
    model.set_trainable_stage("frozen")
    assert top_level_trainable(model) == set()

    assert model.config.knowledge_token_id == processor.knowledge_token_id
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)
    assert model.config.text_config.model_type == llm_family


def test_remote_code_round_trip_in_another_process(build_tiny, tmp_path):
    model, processor = build_tiny("llama")
    model.eval()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for name in ("config.json", "model.safetensors", "configuration_vikdf.py", "modeling_vikdf.py", "processing_vikdf.py"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"].startswith("modeling_vikdf.")

    inputs = processor(text=CONTEXTS[:2], responses=["fine", "nice dog"])
    with torch.no_grad():
        expected = model(**inputs).logits
    save_file({**{k: v.contiguous() for k, v in inputs.items()}, "expected": expected}, tmp_path / "io.safetensors")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        data = load_file({str(tmp_path / "io.safetensors")!r})
        expected = data.pop("expected")
        again = processor(text={CONTEXTS[:2]!r}, responses=["fine", "nice dog"])
        assert all(torch.equal(again[k], data[k]) for k in data), "processor differs"
        with torch.no_grad():
            logits = model(**data).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
        print("ROUND TRIP OK")
        """
    )
    result = run_outside_the_checkout(script, elsewhere)
    assert "ROUND TRIP OK" in result.stdout, result.stderr[-3000:]


def test_knowledge_injection_at_placeholders(build_tiny):
    model, processor = build_tiny("qwen2")
    inputs = processor(text=CONTEXTS[:3])
    with torch.no_grad():
        knowledge = model.get_text_knowledge(inputs["clip_input_ids"], inputs["clip_attention_mask"])
        embeddings = model.embed_with_knowledge(inputs["input_ids"], knowledge)
        token_embeddings = model.get_input_embeddings()(inputs["input_ids"])
        projected = model.language_projection(knowledge)
    slots = inputs["input_ids"] == processor.knowledge_token_id
    assert slots.sum(-1).tolist() == [model.config.num_query_tokens] * 3
    torch.testing.assert_close(embeddings[slots], projected.reshape(-1, projected.shape[-1]))
    torch.testing.assert_close(embeddings[~slots], token_embeddings[~slots])


@pytest.mark.parametrize("llm_family", ["llama", "mistral"])
def test_batched_generate_equals_one_by_one(build_tiny, llm_family):
    model, processor = build_tiny(llm_family)
    model.eval()
    settings = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    batch = processor(text=CONTEXTS)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1, "contexts must differ in length"
    assert (batch["attention_mask"][:, -1] == 1).all(), "generation inputs must be left padded"
    batched = processor.decode_responses(model.generate(**batch, **settings), batch["input_ids"].shape[1])
    for context, response in zip(CONTEXTS, batched):
        alone = processor(text=[context])
        assert processor.decode_responses(model.generate(**alone, **settings), alone["input_ids"].shape[1]) == [response]


def test_paper_size_parameter_counts_on_meta_device():
    config = VIKDFConfig(knowledge_token_id=32000, text_config={"vocab_size": 32001})
    with torch.device("meta"):
        model = VIKDFForConditionalGeneration(config)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    parts = {
        "CLIP text tower + projection": count(model.text_encoder) + count(model.text_projection),
        "CLIP vision tower + projection": count(model.vision_encoder) + count(model.visual_projection),
        "IQ-Former + queries": count(model.iq_former) + model.query_tokens.numel(),
        "LLM": count(model.language_model),
    }
    trainable = {}
    for stage in ("pretrain", "dialogue"):
        model.set_trainable_stage(stage)
        trainable[stage] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, value in {**parts, **{f"trainable ({k})": v for k, v in trainable.items()}}.items():
        print(f"{name:36s} {value / 1e6:10.1f}M")

    assert 123.0e6 < parts["CLIP text tower + projection"] < 124.0e6  # CLIP ViT-L/14 text: 123.1M + 0.6M
    assert 303.5e6 < parts["CLIP vision tower + projection"] < 304.5e6  # ViT-L/14: 303.2M + 0.8M
    assert 95e6 < parts["IQ-Former + queries"] < 110e6  # BERT-base layers, query FFN, 6 cross-attentions
    assert 6.70e9 < parts["LLM"] < 6.76e9  # Llama-2-7B: 6.74B
    assert 150e6 < trainable["pretrain"] < 170e6  # the paper: "159M tuned"
    assert trainable["dialogue"] < trainable["pretrain"]


def test_config_with_mismatched_widths_is_rejected():
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        tiny_vikdf_config(qformer_config={"hidden_size": 32, "encoder_hidden_size": 48, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="mask_patch_size"):
        tiny_vikdf_config(mask_patch_size=6)
    with pytest.raises(ValueError, match="tim_pooling"):
        tiny_vikdf_config(tim_pooling="mean")


def test_processor_rejects_missing_text_and_truncates_clip_from_the_left(build_tiny):
    _, processor = build_tiny("llama")
    with pytest.raises(ValueError, match="needs `text`"):
        processor()
    with pytest.raises(ValueError, match="empty context"):
        processor(text=["  "])
    long_context = ["old " * 200, "the latest turn about a dog"]
    clip = processor.clip_text_inputs([long_context])
    ids = clip["clip_input_ids"][0]
    assert ids.shape[0] == 77
    assert ids[0] == processor.clip_tokenizer.bos_token_id and ids[-1] == processor.clip_tokenizer.eos_token_id
    assert processor.clip_tokenizer.decode(ids, skip_special_tokens=True).endswith("the latest turn about a dog")


def test_over_long_dialogue_context_keeps_latest_tokens(build_tiny):
    _, processor = build_tiny("llama")
    processor.max_length = 64
    batch = processor(text=[["word " * 300, "final question?"]], responses=["an answer"])
    assert batch["input_ids"].shape[1] <= 64
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "final question?" in text and text.count("<knowledge>") == processor.num_query_tokens
    labelled = batch["labels"][0][batch["labels"][0] != -100]
    assert processor.tokenizer.decode(labelled, skip_special_tokens=True).strip() == "an answer"


@pytest.mark.parametrize("llm_family", LLM_FAMILIES)
def test_dialogue_layout_is_the_chat_templates_own_tokenisation(build_tiny, llm_family):
    # The LLM was chat-tuned on its template's text; the response must sit exactly where the template puts it
    # (Llama-2: "[/INST] {response} </s>", ChatML: "assistant\n{response}<|im_end|>").
    _, processor = build_tiny(llm_family)
    context, response = ["hello there", "what did you see?"], "a dog and a red ball"
    batch = processor.dialogue_inputs([context], [response], with_knowledge=False)
    messages = [{"role": "user", "content": "\n".join(context)}, {"role": "assistant", "content": response}]
    rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    expected = processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0]
    assert ids == expected[: len(ids)] and ids[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(labels[labels != -100], skip_special_tokens=True).strip() == response


def test_dialogue_response_falls_back_to_the_bare_response_for_an_inconsistent_template(build_tiny):
    # A template whose conversation does not start with its own generation prompt: the response cannot be cut out.
    _, processor = build_tiny("llama")
    processor.tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'bot: ' }}{% endif %}"
    )
    expected = processor.tokenizer("an answer", add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    assert processor.dialogue_response_ids(" an answer ") == expected


def test_knowledge_placeholders_without_knowledge_give_a_clear_error(build_tiny):
    model, processor = build_tiny("llama")
    inputs = processor(text=["hello"])
    with pytest.raises(ValueError, match="no knowledge was given"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])


def test_checkpoint_folder_missing_weights_gives_a_clear_error(build_tiny, tmp_path):
    model, _ = build_tiny("llama")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors|weights"):
        VIKDFForConditionalGeneration.from_pretrained(tmp_path)


def test_inference_checkpoint_without_pretraining_heads(build_tiny, tmp_path):
    model, processor = build_tiny("llama")
    model.eval()
    inputs = processor(text=CONTEXTS[:2])
    with torch.no_grad():
        expected = model(**inputs).logits
    model.drop_pretraining_heads()
    model.save_pretrained(tmp_path)
    assert not any(k.startswith(("vision_encoder", "tamim", "iamtm")) for k in load_file(tmp_path / "model.safetensors"))
    reloaded = VIKDFForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.vision_encoder is None and top_level_trainable(reloaded) == set(DIALOGUE_TRAINABLE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected)


def test_caption_and_reconstruction_layouts_label_the_right_tokens(build_tiny):
    _, processor = build_tiny("llama")
    tokenizer, n, slot = processor.tokenizer, processor.num_query_tokens, processor.knowledge_token_id
    captions, prompts = ["a red dog in the park", "two cats"], ["Describe the image briefly.", ""]
    iaci = processor.caption_inputs(captions, prompts)
    for row, labels, caption in zip(iaci["input_ids"], iaci["labels"], captions):
        assert row[0] == tokenizer.bos_token_id and (row[1 : n + 1] == slot).all()
        labelled = labels[labels != -100]
        assert labelled[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(labelled[:-1]).strip() == caption
    iakr = processor.reconstruction_inputs(captions, ["Imagine a picture that matches this caption:"] * 2)
    for row, mask in zip(iakr["input_ids"], iakr["attention_mask"]):
        real = row[mask.bool()]
        assert (real[-n:] == slot).all() and (real[:-n] != slot).all()
        assert "a red dog" in tokenizer.decode(real) or "two cats" in tokenizer.decode(real)
