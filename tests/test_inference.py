"""Inference that honours the knowledge: the checkpoint's generation config and the Hub pipeline (paper §3.4.2)."""

import json
import textwrap

import torch
from conftest import run_outside_the_checkout
from transformers import LogitsProcessor, LogitsProcessorList

import train_dialogue
from modeling_vikdf import PAPER_GENERATION
from pipeline_vikdf import textualise_knowledge
from vikdf.evaluation.dialogues import load_checkpoint

CONTEXT = ["what a beautiful sky tonight.", "i always wonder what is up there."]


def _saved(build_tiny, folder):
    model, processor = build_tiny("llama")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_saved_checkpoints_carry_the_papers_generation_config(build_tiny, tmp_path):
    folder = _saved(build_tiny, tmp_path / "ckpt")
    saved = json.loads((folder / "generation_config.json").read_text())
    assert {key: saved.get(key) for key in PAPER_GENERATION} == PAPER_GENERATION
    assert saved.get("temperature") is None and saved.get("top_p") is None  # nothing of a sampling LLM's config


def test_dialogue_checkpoints_decode_as_the_paper_even_from_a_sampling_checkpoint(build_tiny, tmp_path):
    folder = _saved(build_tiny, tmp_path / "pretrained")
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    out = tmp_path / "zero"
    train_dialogue.main(["--model_name_or_path", str(folder), "--train_fraction", "0", "--output_dir", str(out),
                         "--report_to", "none", "--use_cpu", "true"])
    saved = json.loads((out / "generation_config.json").read_text())
    assert {key: saved.get(key) for key in PAPER_GENERATION} == PAPER_GENERATION and saved.get("temperature") is None


def test_bare_generate_follows_the_checkpoints_generation_config(build_tiny, tmp_path):
    folder = _saved(build_tiny, tmp_path / "ckpt")
    model, processor = load_checkpoint(folder)
    inputs = processor(text=[CONTEXT])
    prompt = inputs["input_ids"].shape[1]
    # The paper's settings by default: a bare call equals the explicit released decoding.
    bare = model.generate(**inputs)
    assert torch.equal(bare, model.generate(**inputs, **PAPER_GENERATION))

    config = json.loads((folder / "generation_config.json").read_text())
    config.update(max_new_tokens=3, num_beams=1)
    (folder / "generation_config.json").write_text(json.dumps(config))
    model, processor = load_checkpoint(folder)
    assert model.generate(**inputs).shape[1] - prompt == 3
    assert model.generate(**inputs, max_new_tokens=5).shape[1] - prompt == 5  # a call's own arguments still win


def test_the_text_generation_pipeline_runs_the_whole_vikdf_path_in_a_fresh_process(build_tiny, tmp_path):
    folder = _saved(build_tiny, tmp_path / "checkpoint")
    for name in ("pipeline_vikdf.py", "configuration_vikdf.py", "modeling_vikdf.py", "processing_vikdf.py"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "config.json").read_text())["custom_pipelines"]["text-generation"]["impl"] == (
        "pipeline_vikdf.VIKDFDialoguePipeline"
    )

    model, processor = load_checkpoint(folder)
    inputs = processor(text=[CONTEXT])
    expected = processor.decode_responses(model.generate(**inputs, max_new_tokens=6), inputs["input_ids"].shape[1])[0]
    without = processor.dialogue_inputs([CONTEXT], with_knowledge=False)
    no_knowledge = processor.decode_responses(
        model.generate(**without, max_new_tokens=6), without["input_ids"].shape[1]
    )[0]
    assert expected != no_knowledge, "the knowledge must change this response, or the check below proves nothing"
    knowledge = textualise_knowledge(model, processor, [CONTEXT], max_new_tokens=6)[0]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    messages = [{"role": "user", "content": CONTEXT[0]}, {"role": "assistant", "content": CONTEXT[1]}]
    one_string = "\n".join(CONTEXT)
    script = textwrap.dedent(
        f"""
        from transformers import pipeline
        chat = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True)
        assert type(chat).__module__.startswith("transformers_modules"), type(chat).__module__
        turns = chat({CONTEXT!r}, max_new_tokens=6, return_knowledge=True)
        assert turns == {{"generated_text": {expected!r}, "knowledge": {knowledge!r}}}, turns
        assert chat({messages!r}, max_new_tokens=6) == {{"generated_text": {expected!r}}}
        assert chat({one_string!r}, max_new_tokens=6) == {{"generated_text": {expected!r}}}
        batch = chat([{CONTEXT!r}, {CONTEXT!r}], max_new_tokens=6)
        assert batch == [{{"generated_text": {expected!r}}}] * 2, batch
        print("PIPELINE OK")
        """
    )
    result = run_outside_the_checkout(script, elsewhere)
    assert "PIPELINE OK" in result.stdout, result.stderr[-3000:]


class _SeenLengths(LogitsProcessor):
    """Records how many ids the logits processors are shown at each step."""

    def __init__(self):
        self.lengths = []

    def __call__(self, input_ids, scores):
        self.lengths.append(input_ids.shape[1])
        return scores


def test_logits_processors_see_the_response_only_as_released(build_tiny):
    # The release calls the LLM with embeddings only: `no_repeat_ngram_size` then never blocks n-grams of the context.
    model, processor = build_tiny("llama")
    inputs = processor(text=[CONTEXT, "hello there."])
    seen = _SeenLengths()
    generated = model.generate(**inputs, num_beams=3, max_new_tokens=4, min_new_tokens=4,
                               logits_processor=LogitsProcessorList([seen]))
    assert seen.lengths == [0, 1, 2, 3]
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])  # prompt, then response
    dict_output = model.generate(**inputs, num_beams=3, max_new_tokens=4, min_new_tokens=4,
                                 return_dict_in_generate=True, num_return_sequences=2)
    assert torch.equal(dict_output.sequences[::2], generated)
