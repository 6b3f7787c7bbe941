"""Evaluation library: batched generation, perplexity, textualised knowledge, reports and model cards (paper §4.4, §5)."""

import json
import math

import pytest
import torch

import eval_dialogue
from vikdf.evaluation import (
    METRIC_KEYS,
    aggregate_metrics,
    generate_responses,
    metrics_markdown,
    normalise_metric_keys,
    perplexity,
    response_nll,
)
from vikdf.knowledge import caption_prompt_ids, textualise_knowledge
from vikdf.model_card import build_model_card, update_model_card_metrics

CONTEXTS = [
    ["hello there", "what did you see at the park today?"],
    "a dog in the park",
    ["i love the beach", "the weather is sunny", "shall we go swimming tomorrow morning?"],
    "hi",
    ["two people are sitting at a table in a restaurant", "what are they eating?"],
]
RESPONSES = ["a dog with a red ball.", "it looks happy!", "yes, let's go to the beach.", "hello", "a bowl of fruit."]
TABLE1_HEADER = "| PPL | BLEU-1 | ROUGE-L | Average | Extrema | Greedy | Dis-1 | Dis-2 |"


@pytest.mark.parametrize(("num_beams", "with_knowledge"), [(3, True), (1, True), (3, False)])
def test_batched_generation_equals_batch_size_one(build_tiny, num_beams, with_knowledge):
    model, processor = build_tiny("llama")
    settings = dict(num_beams=num_beams, max_new_tokens=10, progress=False, with_knowledge=with_knowledge)
    batched = generate_responses(model, processor, CONTEXTS, batch_size=3, **settings)
    one_by_one = generate_responses(model, processor, CONTEXTS, batch_size=1, **settings)
    assert batched == one_by_one
    assert len(batched) == len(CONTEXTS) and all(isinstance(text, str) for text in batched)


def test_batched_generation_equals_batch_size_one_qwen2(build_tiny):
    # Qwen2 has no bos and a pad token of its own: another padding layout.
    model, processor = build_tiny("qwen2")
    settings = dict(num_beams=3, max_new_tokens=10, progress=False)
    assert generate_responses(model, processor, CONTEXTS, batch_size=5, **settings) == generate_responses(
        model, processor, CONTEXTS, batch_size=1, **settings
    )


def manual_nll(model, processor, context, response) -> tuple[float, int]:
    """NLL of response + eos computed token by token from one unpadded sequence, independently of the library."""
    prompt = processor.dialogue_prompt_ids(context)
    target = processor.dialogue_response_ids(response)
    clip = processor.clip_text_inputs([context])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + target]), **clip).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll = -sum(log_probs[len(prompt) + j - 1, token].item() for j, token in enumerate(target))
    return nll, len(target)


def test_perplexity_is_exp_of_mean_response_token_nll(build_tiny):
    model, processor = build_tiny("llama")
    model.eval()
    contexts, responses = CONTEXTS[:3], RESPONSES[:3]
    parts = [manual_nll(model, processor, c, r) for c, r in zip(contexts, responses)]
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)

    got_total, got_count = response_nll(model, processor, contexts, responses, batch_size=2)
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)
    assert perplexity(model, processor, contexts, responses, batch_size=3) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_textualise_knowledge_returns_one_text_per_context(build_tiny):
    model, processor = build_tiny("llama")
    prompt = model.config.caption_prompts[0]
    ids = caption_prompt_ids(processor, prompt)
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids.count(processor.knowledge_token_id) == model.config.num_query_tokens
    assert processor.tokenizer.decode(ids, skip_special_tokens=True).strip().endswith(prompt)

    texts = textualise_knowledge(model, processor, CONTEXTS[:3], max_new_tokens=6, batch_size=2)
    assert len(texts) == 3 and all(isinstance(text, str) for text in texts)
    assert texts == textualise_knowledge(model, processor, CONTEXTS[:3], max_new_tokens=6, batch_size=1)


def test_metrics_markdown_has_table1_columns_and_dashes_for_missing():
    metrics = {"ppl": 15.014, "bleu_1": 16.41, "rouge_l": 14.82, "embedding_average": None, "vector_extrema": None,
               "greedy_matching": None, "distinct_1": 3.1, "distinct_2": 20.0}
    lines = metrics_markdown(metrics).splitlines()
    assert lines[0] == TABLE1_HEADER
    assert lines[2] == "| 15.01 | 16.41 | 14.82 | – | – | – | 3.10 | 20.00 |"
    assert normalise_metric_keys({"PPL": 1, "BLEU-1": 2, "Dis-2": 3}) == {"ppl": 1.0, "bleu_1": 2.0, "distinct_2": 3.0}


def test_aggregate_mode_writes_mean_std_and_t_tests(tmp_path):
    runs = []
    for seed, bleu in enumerate([16.3, 16.5, 16.4, 16.6, 16.2]):
        path = tmp_path / f"seed{seed}" / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"ppl": 15.0 + seed / 10, "bleu_1": bleu, "rouge_l": 14.8, "embedding_average": None}))
        runs.append(str(path))
    reference = tmp_path / "zrigf.json"
    reference.write_text(json.dumps({"PPL": 36.21, "BLEU-1": 16.06, "ROUGE-L": 14.5}))

    summary = eval_dialogue.main(["--aggregate", *runs, "--reference_json", str(reference), "--output_dir", str(tmp_path / "agg")])
    assert list(summary) == [key for key in METRIC_KEYS if key in summary]
    assert summary["bleu_1"]["n"] == 5 and summary["bleu_1"]["mean"] == pytest.approx(16.4)
    assert summary["bleu_1"]["p"] < 0.05 and summary["ppl"]["p"] < 0.05
    assert summary["rouge_l"]["p"] is None  # every run equal: no t statistic
    assert summary["embedding_average"]["mean"] is None
    markdown = (tmp_path / "agg" / "aggregate.md").read_text()
    assert markdown.startswith(TABLE1_HEADER) and "16.40 ± 0.16*" in markdown
    assert json.loads((tmp_path / "agg" / "aggregate.json").read_text())["runs"] == runs
    assert aggregate_metrics([{"bleu_1": 1.0}], None)["bleu_1"]["std"] is None


def test_model_card_metrics_rows_replace_per_test_set(tmp_path):
    card = build_model_card(base_model="meta-llama/Llama-2-7b-chat-hf", train_file="reddit/train.json", datasets=["x/reddit"])
    card.save(tmp_path / "README.md")
    assert card.data.base_model == "meta-llama/Llama-2-7b-chat-hf"
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert "vikdf" in card.data.tags and card.data.datasets == ["x/reddit"]
    assert "trust_remote_code=True" in card.text and "processor.decode_responses" in card.text

    metrics = dict.fromkeys(METRIC_KEYS, 1.0)
    update_model_card_metrics(tmp_path, metrics, "image_chat/test.json")
    update_model_card_metrics(tmp_path, {**metrics, "ppl": 2.0}, "image_chat/test.json")
    update_model_card_metrics(tmp_path, metrics, "reddit/test.json")
    text = (tmp_path / "README.md").read_text()
    assert text.count("| image_chat/test.json |") == 1 and "| image_chat/test.json | 2.00 |" in text
    assert "| reddit/test.json | 1.00 |" in text
    assert text.count("| Test set | PPL | BLEU-1 |") == 1
    assert "meta-llama/Llama-2-7b-chat-hf" in text  # the rest of the card survives


def test_local_base_model_is_named_by_its_folder_name_in_text_not_metadata(tmp_path):
    card = build_model_card(base_model=str(tmp_path), method="lora", train_fraction=0.0)
    assert card.data.base_model is None and f"`{tmp_path.name}` (a local folder)" in card.text
    assert str(tmp_path) not in card.text
    assert "with_knowledge=False" in card.text and "zero-resource" in card.text
