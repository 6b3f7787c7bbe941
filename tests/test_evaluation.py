"""Evaluation library: batched generation, perplexity, textualised knowledge, reports and model cards (paper §4.4, §5)."""

import json
import math

import pytest
import torch

import eval_dialogue
from vikdf.evaluation.dialogues import (
    METRIC_KEYS,
    aggregate_metrics,
    evaluate_dialogues,
    generate_responses,
    metrics_markdown,
    normalise_metric_keys,
    perplexities,
    response_nll,
    summary_markdown,
    write_evaluation,
)
from vikdf.evaluation import dialogue_metrics as dm
from pipeline_vikdf import textualise_knowledge
from vikdf.evaluation.model_card import build_model_card, update_model_card_metrics

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


def test_perplexity_conventions(build_tiny):
    model, processor = build_tiny("llama")
    model.eval()
    contexts, responses = CONTEXTS[:3], RESPONSES[:3]
    parts = [manual_nll(model, processor, c, r) for c, r in zip(contexts, responses)]
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)

    totals, counts = response_nll(model, processor, contexts, responses, batch_size=2)
    assert counts == [p[1] for p in parts] and len(set(counts)) > 1  # responses of different lengths
    assert totals == pytest.approx([p[0] for p in parts], rel=1e-5)
    # The release's PPL (Table 1): exp of the mean over dialogues of each dialogue's mean token NLL.
    released = math.exp(sum(nll / n for nll, n in parts) / len(parts))
    token_level = math.exp(total / count)
    assert perplexities(totals, counts) == pytest.approx({"ppl": released, "ppl_token": token_level}, rel=1e-5)
    assert released != pytest.approx(token_level, rel=1e-3)


def test_perplexities_by_hand():
    # Dialogue 1: NLL 2 over 1 token; dialogue 2: NLL 3 over 3 tokens.
    got = perplexities([2.0, 3.0], [1, 3])
    assert got == {"ppl": pytest.approx(math.exp((2 + 1) / 2)), "ppl_token": pytest.approx(math.exp(5 / 4))}
    with pytest.raises(ValueError, match=r"Dialogues \[1\] have no response token"):
        perplexities([2.0, 0.0], [1, 0])


def test_textualise_knowledge_returns_one_text_per_context(build_tiny):
    model, processor = build_tiny("llama")
    prompt = model.config.caption_prompts[0]
    ids = processor.caption_prompt_ids(prompt)
    # the IACI rows pre-training read (eq. 6) begin so: textualisation continues where their caption begins
    caption_row = processor.caption_inputs(["a red zorp."], [prompt])
    labelled = caption_row["labels"][0] != -100
    assert caption_row["input_ids"][0][: int(labelled.nonzero()[0])].tolist() == ids
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
    assert normalise_metric_keys({"PPL": 1, "BLEU-1": 2, "Dis-2": 3, "ppl_token": 4}) == {
        "ppl": 1.0, "bleu_1": 2.0, "distinct_2": 3.0, "ppl_token": 4.0
    }


def test_evaluation_reports_both_ppl_figures_and_the_tokenizer(build_tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "punkt_available", lambda: False)
    model, processor = build_tiny("llama")
    dialogues = [{"context": c, "response": r} for c, r in zip(CONTEXTS[:3], RESPONSES[:3])]
    result = evaluate_dialogues(model, processor, dialogues, batch_size=2, max_new_tokens=4, progress=False)
    assert list(result["metrics"]) == list(METRIC_KEYS) and METRIC_KEYS[-1] == "ppl_token"
    expected = perplexities(*response_nll(model, processor, CONTEXTS[:3], RESPONSES[:3]))
    assert result["metrics"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
    assert result["metrics"]["ppl_token"] == pytest.approx(expected["ppl_token"], rel=1e-6)
    assert result["tokenizer"] == dm.FALLBACK_TOKENIZER

    write_evaluation(tmp_path, result, info={"test_file": "x.json"})
    assert json.loads((tmp_path / "eval_info.json").read_text())["tokenizer"] == dm.FALLBACK_TOKENIZER
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(result["metrics"])
    markdown = (tmp_path / "metrics.md").read_text()
    assert markdown.startswith(metrics_markdown(result["metrics"]))
    assert f"token-level PPL exp(total NLL / tokens): {expected['ppl_token']:.2f}" in markdown
    assert f"Word tokeniser of BLEU, ROUGE and the embedding metrics: {dm.FALLBACK_TOKENIZER}." in markdown


def test_aggregate_mode_writes_mean_std_and_t_tests(tmp_path):
    runs = []
    for seed, bleu in enumerate([16.3, 16.5, 16.4, 16.6, 16.2]):
        path = tmp_path / f"seed{seed}" / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"ppl": 15.0 + seed / 10, "bleu_1": bleu, "rouge_l": 14.8, "embedding_average": None}))
        if seed:  # the first run predates the tokeniser record
            (path.parent / "eval_info.json").write_text(json.dumps({"tokenizer": dm.FALLBACK_TOKENIZER}))
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
    assert markdown.startswith(TABLE1_HEADER) and "16.40 ± 0.16* (p = " in markdown
    record = json.loads((tmp_path / "agg" / "aggregate.json").read_text())
    assert record["runs"] == runs and record["tokenizers"] == [None] + [dm.FALLBACK_TOKENIZER] * 4
    assert f"in these runs: not recorded, {dm.FALLBACK_TOKENIZER}." in markdown
    assert aggregate_metrics([{"bleu_1": 1.0}], None)["bleu_1"]["std"] is None


def test_model_card_metrics_rows_replace_per_test_set(tmp_path):
    card = build_model_card(base_model="meta-llama/Llama-2-7b-chat-hf", train_file="reddit/train.json", datasets=["x/reddit"])
    card.save(tmp_path / "README.md")
    assert card.data.base_model == "meta-llama/Llama-2-7b-chat-hf"
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert "vikdf" in card.data.tags and card.data.datasets == ["x/reddit"]
    assert "trust_remote_code=True" in card.text and "processor.decode_responses" in card.text

    metrics = dict.fromkeys(METRIC_KEYS, 1.0)
    update_model_card_metrics(tmp_path, metrics, "image_chat/test.json", tokenizer=dm.FALLBACK_TOKENIZER)
    update_model_card_metrics(tmp_path, {**metrics, "ppl": 2.0}, "image_chat/test.json", tokenizer=dm.PUNKT_TOKENIZER)
    update_model_card_metrics(tmp_path, metrics, "reddit/test.json", tokenizer=dm.FALLBACK_TOKENIZER)
    text = (tmp_path / "README.md").read_text()
    assert text.count("| image_chat/test.json |") == 1 and "| image_chat/test.json | 2.00 |" in text
    assert "| reddit/test.json | 1.00 |" in text
    assert text.count("| Test set | PPL | BLEU-1 |") == 1
    assert "| Dis-1 | Dis-2 | Tokeniser |" in text
    assert f"| 1.00 | {dm.PUNKT_TOKENIZER} |\n" in text and f"| 1.00 | {dm.FALLBACK_TOKENIZER} |\n" in text
    assert "meta-llama/Llama-2-7b-chat-hf" in text  # the rest of the card survives


def test_local_base_model_is_named_by_its_folder_name_in_text_not_metadata(tmp_path):
    card = build_model_card(base_model=str(tmp_path), method="lora", train_fraction=0.0)
    assert card.data.base_model is None and f"`{tmp_path.name}` (a local folder)" in card.text
    assert str(tmp_path) not in card.text
    assert "with_knowledge=False" in card.text and "zero-resource" in card.text


def test_summary_marks_only_improvements_and_shows_p():
    # BLEU-1 is significantly worse than the reference and PPL significantly better (lower).
    runs = [{"ppl": 15.0 + d, "bleu_1": 12.0 + d} for d in (0.0, 0.1, 0.2, 0.1, 0.15)]
    summary = aggregate_metrics(runs, {"ppl": 36.21, "bleu_1": 16.06})
    row = summary_markdown(summary).splitlines()[2].split(" | ")
    ppl_cell, bleu_cell = row[0].lstrip("| "), row[1]
    assert ppl_cell.startswith("15.11 ± 0.07* (p = ") and summary["ppl"]["p"] < 0.05
    assert bleu_cell.startswith("12.11 ± 0.07 (p = ") and summary["bleu_1"]["p"] > 0.95
