"""The LLM layouts and batched generation on a real chat LLM, SmolLM2-135M-Instruct: a 49,152-token byte-level BPE
whose ChatML template writes a default system turn and closes every turn with `<|im_end|>\\n`, and whose bos
(`<|im_start|>`) and pad (`<|im_end|>`, also its eos) are template tokens.

The tokenizers of test_tokenisation_seams.py and the LLMs of test_evaluation.py are tiny ones trained for the tests;
these checks run next to them on the tokenizer, template and weights a user gets: the three seam tests themselves
(collected here with SmolLM2's processor), the response ids against the template's own rendering, and batched
generation against batch size 1 as `test_batched_generation_equals_batch_size_one` and
`test_batched_generation_equals_batch_size_one_qwen2` check it on the tiny Llama and Qwen2."""

import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor

from processing_vikdf import VIKDFProcessor
from test_evaluation import CONTEXTS
from test_tokenisation_seams import (  # noqa: F401  (collected here too, with this module's `processor`)
    _plain,
    test_caption_rows_are_the_plain_texts_tokens_with_no_lone_marker,
    test_dialogue_prompt_with_slots_is_the_plain_prompt_with_slots_inserted,
    test_reconstruction_rows_are_the_plain_texts_tokens_then_the_slots,
)
from vikdf.training.components import build_vikdf_from_components
from vikdf.evaluation.dialogues import generate_responses
from vikdf.testing import TINY_HEADS, tiny_clip_tokenizer

USER = "what did you do this weekend?"
# A capital first letter, punctuation first, accented letters and an emoji that byte-level BPE splits into byte
# tokens: first tokens and merges that the ids cut from the rendering must keep as the rendering has them.
RESPONSES = ["Yes, it was fun.", "! that sounds great", "café au lait, s'il vous plaît", "we went hiking 🏔️"]


@pytest.fixture(scope="module")
def processor(smollm2):
    """SmolLM2's processor as the component loader builds it; `VIKDFProcessor` adds `<knowledge>` to the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return VIKDFProcessor(CLIPImageProcessor(), tokenizer, tiny_clip_tokenizer(), num_query_tokens=3)


@pytest.fixture(scope="module")
def smollm2_vikdf(smollm2, tiny_components):
    """A fresh VIKDF (seed 0) over tiny CLIP and BERT towers whose LLM is the real SmolLM2, in eval mode."""
    torch.manual_seed(0)
    paths = tiny_components("llama")
    model, processor = build_vikdf_from_components(
        str(paths.clip), str(paths.bert), str(smollm2), num_query_tokens=8, **TINY_HEADS
    )
    return model.eval(), processor


def test_smollm2_makes_a_lone_word_start_marker_of_a_trailing_space(processor):
    # Why the seam tests bite here: pieces tokenised apart get a lone `Ġ` and lose the next word's marker.
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens(_plain(processor, "a dog ")) == ["a", "Ġdog", "Ġ"]
    assert tokenizer.convert_ids_to_tokens(_plain(processor, " a dog")) == ["Ġa", "Ġdog"]


@pytest.mark.parametrize("response", RESPONSES, ids=["capital-first", "punctuation-first", "accented", "emoji"])
def test_response_ids_are_the_assistant_turn_of_the_templates_own_rendering(processor, response):
    tokenizer = processor.tokenizer
    user = [{"role": "user", "content": USER}]
    prompt = _plain(processor, tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
    conversation = [*user, {"role": "assistant", "content": response}]
    full = _plain(processor, tokenizer.apply_chat_template(conversation, tokenize=False))
    response_ids = processor.dialogue_response_ids(response)
    # The turn ends with the end-of-turn token generation stops at; the newline after it is template text between
    # turns, which the model is never asked to write.
    assert full == prompt + response_ids + _plain(processor, "\n")
    assert response_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert tokenizer.decode(response_ids[:-1]) == response
    # The plain prompt is the template's generation prompt, so a baseline's row is the conversation as rendered.
    assert processor.dialogue_prompt_ids(USER, with_knowledge=False) == prompt


@pytest.mark.parametrize("with_knowledge", [True, False], ids=["with-knowledge", "plain-llm"])
def test_batched_generation_equals_batch_size_one_on_smollm2(smollm2_vikdf, with_knowledge):
    model, processor = smollm2_vikdf
    mask = processor.dialogue_batch(CONTEXTS, with_knowledge=with_knowledge)["attention_mask"]
    # One left-padded batch of rows of different lengths, every row ending where generation begins.
    assert len(set(mask.sum(dim=1).tolist())) > 1 and bool(mask[:, -1].all())
    settings = dict(num_beams=3, max_new_tokens=8, progress=False, with_knowledge=with_knowledge)
    batched = generate_responses(model, processor, CONTEXTS, batch_size=len(CONTEXTS), **settings)
    assert batched == generate_responses(model, processor, CONTEXTS, batch_size=1, **settings)
    assert all(batched)  # real text on every row, so the equality compares generations, not empty strings
