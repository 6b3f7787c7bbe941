"""Tokenisation seams of the LLM layouts (processing_vikdf.py) for SentencePiece/Metaspace tokenizers (Llama-2,
Mistral) and byte-level BPE (Qwen2's ChatML): every row is the plain text's own tokenisation with the knowledge
slots put in between, so no lone word-start marker appears and the word after the slots keeps its marker."""

import pytest
from transformers import CLIPImageProcessor

from processing_vikdf import IGNORE_INDEX, VIKDFProcessor
from vikdf.testing import DEFAULT_CORPUS, tiny_clip_tokenizer, tiny_llm_tokenizer

CAPTION_PROMPT = "Write a short description for the image."
RECONSTRUCTION_PROMPT = "Create an image that reflects the following description:"
CORPUS = [*DEFAULT_CORPUS, CAPTION_PROMPT, RECONSTRUCTION_PROMPT]
CAPTIONS = ["a dog playing in the park", "the cat sleeps on a blue sofa"]
CONTEXT = ["what did you do this weekend?", "i went hiking in the mountains."]
# (family, SentencePiece/Metaspace?): Llama-2 and Mistral ship Metaspace tokenizers, Qwen2 a byte-level one.
KINDS = [("llama", True), ("mistral", True), ("qwen2", False)]


@pytest.fixture(scope="module", params=KINDS, ids=[f"{family}-{'metaspace' if sp else 'bytelevel'}" for family, sp in KINDS])
def processor(request):
    family, sentencepiece = request.param
    tokenizer = tiny_llm_tokenizer(family, CORPUS, 400, sentencepiece=sentencepiece)
    return VIKDFProcessor(CLIPImageProcessor(), tokenizer, tiny_clip_tokenizer(), num_query_tokens=3)


def _plain(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def _without_slots(processor, row) -> list[int]:
    return [int(i) for i in row if int(i) != processor.knowledge_token_id]


def _lone_markers(processor) -> set[int]:
    vocab = processor.tokenizer.get_vocab()
    return {vocab[marker] for marker in ("▁", "Ġ") if marker in vocab}


def test_caption_rows_are_the_plain_texts_tokens_with_no_lone_marker(processor):
    rows = processor.caption_inputs(CAPTIONS, [CAPTION_PROMPT] * 2)
    bos = processor._bos()
    for row, labels, mask, caption in zip(rows["input_ids"], rows["labels"], rows["attention_mask"], CAPTIONS):
        real = row[mask.bool()]
        plain = _plain(processor, f"{CAPTION_PROMPT} {caption}")
        assert _without_slots(processor, real) == bos + plain + [processor.tokenizer.eos_token_id]
        assert not _lone_markers(processor) & set(real.tolist())
        # the first word after the slots is tokenised as at the start of a plain text
        after_slots = int(real[len(bos) + processor.num_query_tokens])
        assert after_slots == _plain(processor, CAPTION_PROMPT)[0]
        # the labels are the caption's tokens as they stand in the plain text
        labelled = labels[labels != IGNORE_INDEX].tolist()
        assert labelled[: -1] == plain[len(plain) - len(labelled) + 1 :]
        assert processor.tokenizer.decode(labelled[:-1]).strip() == caption


def test_reconstruction_rows_are_the_plain_texts_tokens_then_the_slots(processor):
    rows = processor.reconstruction_inputs(CAPTIONS, [RECONSTRUCTION_PROMPT] * 2)
    for row, mask, caption in zip(rows["input_ids"], rows["attention_mask"], CAPTIONS):
        real = row[mask.bool()].tolist()
        n = processor.num_query_tokens
        assert real[-n:] == [processor.knowledge_token_id] * n
        assert real[:-n] == processor._bos() + _plain(processor, f"{RECONSTRUCTION_PROMPT} {caption}")


def test_dialogue_prompt_with_slots_is_the_plain_prompt_with_slots_inserted(processor):
    with_slots = processor.dialogue_prompt_ids(CONTEXT)
    plain = processor.dialogue_prompt_ids(CONTEXT, with_knowledge=False)
    assert _without_slots(processor, with_slots) == plain
    first = with_slots.index(processor.knowledge_token_id)
    assert with_slots[first : first + processor.num_query_tokens] == [processor.knowledge_token_id] * 3
    # the context's first word carries its marker as in the plain template (e.g. `▁what` after Llama's `[INST] `)
    assert with_slots[first + processor.num_query_tokens] == plain[first]


def test_metaspace_tokenizer_of_the_tests_behaves_like_llamas():
    tokenizer = tiny_llm_tokenizer("llama", CORPUS, 400, sentencepiece=True)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a dog ", add_special_tokens=False)["input_ids"])
    assert tokens == ["▁a", "▁dog", "▁"]  # a trailing space is a lone marker: why pieces must not be joined
    with pytest.raises(ValueError, match="byte-level"):
        tiny_llm_tokenizer("qwen2", CORPUS, 400, sentencepiece=True)
