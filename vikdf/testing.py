"""Tiny VIKDF parts for tests and for anyone who wants a working model in seconds, with no download.

Two entry points:

- `tiny_vikdf_config(llm_family)`: a `VIKDFConfig` of the paper's shape at toy widths.
- `write_tiny_components(directory, llm_family)`: tiny CLIP, BERT and LLM folders laid out like their hub
  repositories (config, safetensors weights, tokenizer, image processor), so that `vikdf.training.components` loads them
  through exactly the code path `openai/clip-vit-large-patch14`, `bert-base-uncased` and
  `meta-llama/Llama-2-7b-chat-hf` take.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedTokenizerFast,
)

from configuration_vikdf import VIKDFConfig
from vikdf.training.components import iq_former_config_from_bert

LLM_FAMILIES = ("llama", "qwen2", "mistral")

# Chat templates in the form each family's real tokenizer ships: Llama-2 [INST], Qwen2 ChatML, Mistral [INST].
LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + '[/INST]' }}{% else %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Special tokens per family: (bos, eos, unk, pad, extra specials, chat template).
FAMILY_TOKENS = {
    "llama": ("<s>", "</s>", "<unk>", None, [], LLAMA2_CHAT_TEMPLATE),
    "qwen2": (None, "<|im_end|>", None, "<|endoftext|>", ["<|im_start|>"], CHATML_TEMPLATE),
    "mistral": ("<s>", "</s>", "<unk>", None, ["[INST]", "[/INST]"], MISTRAL_CHAT_TEMPLATE),
}

# Head and masking sizes that fit the tiny towers (32-pixel images, width 32); pass them to
# `build_vikdf_from_components` or the training scripts' --config_overrides.
# No head dropout: the released 0.1 is noise far above what these width-32 heads can learn in a few steps; the
# paper-size default stays as released.
TINY_HEADS = {
    "mask_patch_size": 8,
    "head_num_attention_heads": 4,
    "head_intermediate_size": 64,
    "head_dropout": 0.0,
    "tim_embed_dim": 16,
}

DEFAULT_CORPUS = (
    "a photo of a dog playing in the park with a red ball",
    "two people are sitting at a table in a restaurant",
    "the cat sleeps on a blue sofa next to the window",
    "what did you do this weekend? i went hiking in the mountains.",
    "that sounds great, i love the view from the top.",
    "a man riding a bike down a busy city street",
    "i think the weather will be sunny tomorrow, let's go to the beach!",
    "a bowl of fruit with apples, bananas and oranges on a wooden table",
)


@dataclass(frozen=True)
class TinyComponentPaths:
    """Folders of tiny pretrained-style components, each loadable with `from_pretrained`."""

    clip: Path
    bert: Path
    llm: Path | None  # None: no LLM written (the demo's real-LLM presets bring their own)


def _check_family(llm_family: str) -> None:
    if llm_family not in LLM_FAMILIES:
        raise ValueError(f"llm_family={llm_family!r}; choose one of {LLM_FAMILIES}.")


def tiny_clip_config(vocab_size: int = 512, image_size: int = 32, patch_size: int = 4, width: int = 32) -> CLIPConfig:
    # Token ids follow `tiny_clip_tokenizer`: start-of-text 0, end-of-text 1 (which CLIP also pads with).
    text = dict(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
    )
    vision = dict(
        image_size=image_size, patch_size=patch_size, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=width,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def tiny_bert_config(width: int = 32) -> BertConfig:
    # No dropout: at width 32 BERT's 0.1 dropout noise is far larger than what the freshly initialised
    # cross-attention adds to the queries, and the IQ-Former then cannot even overfit one TIM batch.
    return BertConfig(
        vocab_size=128, hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def tiny_llm_config(llm_family: str = "llama", vocab_size: int = 512, width: int = 64):
    _check_family(llm_family)
    return AutoConfig.for_model(
        llm_family, vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )


def tiny_vikdf_config(llm_family: str = "llama", num_query_tokens: int = 8, **overrides) -> VIKDFConfig:
    """A `VIKDFConfig` of the paper's structure at toy size (32-pixel images, width-32 towers, 2 layers each)."""
    clip = tiny_clip_config()
    bert = tiny_bert_config()
    qformer = iq_former_config_from_bert(bert, encoder_hidden_size=clip.projection_dim).to_dict()
    settings = dict(
        clip_config=clip.to_dict(), qformer_config=qformer, text_config=tiny_llm_config(llm_family).to_dict(),
        num_query_tokens=num_query_tokens, knowledge_token_id=511, **TINY_HEADS,
    )
    settings.update(overrides)
    return VIKDFConfig(**settings)


def train_byte_level_tokenizer(
    corpus: Iterable[str], vocab_size: int, special_tokens: list[str], lowercase: bool = False
) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `corpus`: any text encodes, frequent words get whole tokens."""
    tokenizer = Tokenizer(models.BPE())
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return tokenizer


def train_sentencepiece_style_tokenizer(corpus: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A BPE tokenizer with the Metaspace pre-tokenizer of Llama-2's and Mistral's fast tokenizers (`▁` marks a word
    start, prepended to the first piece of a text only, no split on spaces when encoding). Printable ASCII is in the
    alphabet, so chat templates such as `[INST]` encode without unknown tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token=special_tokens[0] if special_tokens else None))
    # Train on words (pieces never span a space, as in SentencePiece), then encode whole texts as Llama's does.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=[chr(code) for code in range(33, 127)] + ["▁"],
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return tokenizer


def tiny_clip_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A CLIP-style tokenizer: lowercased, `<|startoftext|>` … `<|endoftext|>`, padded with end-of-text."""
    backend = train_byte_level_tokenizer(corpus, vocab_size, ["<|startoftext|>", "<|endoftext|>"], lowercase=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77,
    )


def tiny_llm_tokenizer(
    llm_family: str = "llama",
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 510,
    sentencepiece: bool = False,
) -> PreTrainedTokenizerFast:
    """A tokenizer with the special tokens and chat template of `llm_family`'s real tokenizer.

    Byte-level BPE by default (Qwen2's kind); `sentencepiece=True` gives the Metaspace kind of Llama-2 and Mistral.
    """
    _check_family(llm_family)
    bos, eos, unk, pad, extra, template = FAMILY_TOKENS[llm_family]
    if sentencepiece:
        if unk is None:
            raise ValueError(f"{llm_family} tokenizers are byte-level BPE; sentencepiece=True fits llama and mistral.")
        specials = [token for token in (unk, bos, eos, pad, *extra) if token is not None]
        backend = train_sentencepiece_style_tokenizer(corpus, vocab_size, specials)
    else:
        specials = [token for token in (bos, eos, unk, pad, *extra) if token is not None]
        backend = train_byte_level_tokenizer(corpus, vocab_size, specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        additional_special_tokens=extra or None, model_max_length=512,
    )
    tokenizer.chat_template = template
    return tokenizer


def write_tiny_components(
    directory: str | Path,
    llm_family: str | None = "llama",
    corpus: Iterable[str] = DEFAULT_CORPUS,
    image_size: int = 32,
    seed: int = 0,
    vocab_size: int = 512,
) -> TinyComponentPaths:
    """Write random tiny CLIP, BERT and LLM folders (weights, configs, tokenizers, image processor) to `directory`.

    `vocab_size` bounds both BPE vocabularies (fewer entries when `corpus` has fewer distinct pieces); the LLM's
    leaves room for the `<knowledge>` token the component loader adds, as real LLMs do. `llm_family=None` writes
    CLIP and BERT only.
    """
    if llm_family is not None:
        _check_family(llm_family)
    corpus = list(corpus)
    root = Path(directory)
    paths = TinyComponentPaths(clip=root / "clip", bert=root / "bert",
                               llm=None if llm_family is None else root / f"llm-{llm_family}")
    torch.manual_seed(seed)

    clip_tokenizer = tiny_clip_tokenizer(corpus, vocab_size)
    clip = CLIPModel(tiny_clip_config(vocab_size=len(clip_tokenizer), image_size=image_size))
    clip.save_pretrained(paths.clip)
    clip_tokenizer.save_pretrained(paths.clip)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(paths.clip)

    BertModel(tiny_bert_config()).save_pretrained(paths.bert)
    if llm_family is None:
        return paths

    llm_tokenizer = tiny_llm_tokenizer(llm_family, corpus, vocab_size - 2)
    llm = AutoModelForCausalLM.from_config(tiny_llm_config(llm_family, vocab_size=len(llm_tokenizer)))
    llm.config.bos_token_id = llm_tokenizer.bos_token_id
    llm.config.eos_token_id = llm_tokenizer.eos_token_id
    llm.config.pad_token_id = llm_tokenizer.pad_token_id
    llm.generation_config.bos_token_id = llm_tokenizer.bos_token_id
    llm.generation_config.eos_token_id = llm_tokenizer.eos_token_id
    llm.generation_config.pad_token_id = llm_tokenizer.pad_token_id
    llm.save_pretrained(paths.llm)
    llm_tokenizer.save_pretrained(paths.llm)
    return paths


__all__ = [
    "LLM_FAMILIES",
    "TINY_HEADS",
    "TinyComponentPaths",
    "tiny_vikdf_config",
    "write_tiny_components",
    "tiny_clip_tokenizer",
    "tiny_llm_tokenizer",
    "train_sentencepiece_style_tokenizer",
]
