"""Processor of VIKDF: CLIP tokenizer + CLIP image processor + LLM tokenizer + the three LLM layouts.

Layouts, `<k>×n` being n copies of the knowledge placeholder:

- dialogue (§3.4): the LLM's own chat template, the knowledge slots right after the template's opening (the start
  of the user turn), the context turns joined by newlines; the response written as the template writes an
  assistant turn, labels on it and its end-of-sequence only;
- IACI caption (eq. 6): `[bos] <k>×n {caption prompt} {caption}[eos]`, labels on the caption (and, by choice,
  eos);
- IAKR reconstruction (eq. 7–8): `[bos] {reconstruction prompt} {caption} <k>×n`, no labels.

The CLIP text side joins the context turns and truncates them from the *left* to 77 tokens, so that the latest
turn, which the response answers, survives; captions keep their start, as CLIP truncates.

Hub remote code: imports only torch, transformers and `configuration_vikdf`.
"""

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import BatchFeature, ProcessorMixin
from transformers.tokenization_utils_base import AddedToken
from transformers.utils import logging

# Imported for its registration of the `vikdf` model type: loading the tokenizer reads the checkpoint's config.
try:
    from . import configuration_vikdf  # noqa: F401
except ImportError:
    import configuration_vikdf  # noqa: F401

logger = logging.get_logger(__name__)

# Label of every position no loss reads (prompt, padding, unmasked tokens): cross-entropy's default ignore_index.
IGNORE_INDEX = -100

# One turn, the turns oldest first, or chat messages (`VIKDFProcessor.context_turns`).
Context = str | Sequence[str] | Sequence[dict[str, str]]


def _batch(tokenizer, rows: list[list[int]], side: str, labels: list[list[int]] | None = None) -> dict:
    """`input_ids` and `attention_mask` padded on `side` by `tokenizer` (its pad id; mask 0 on padding), and
    `labels` padded alike with IGNORE_INDEX, which the tokenizer does not pad."""
    batch = dict(tokenizer.pad({"input_ids": rows}, padding_side=side, return_attention_mask=True, return_tensors="pt"))
    if labels is not None:
        rows_of_labels = [torch.tensor(row, dtype=torch.long) for row in labels]
        batch["labels"] = pad_sequence(rows_of_labels, batch_first=True, padding_value=IGNORE_INDEX, padding_side=side)
    return batch


class VIKDFProcessor(ProcessorMixin):
    r"""
    Builds every input VIKDF takes.

    Args:
        image_processor: CLIP's image processor (pixel values for the vision tower).
        tokenizer: the LLM's tokenizer; the knowledge placeholder is added to it if missing.
        clip_tokenizer: CLIP's tokenizer (text tower inputs).
        num_query_tokens: n, the number of knowledge slots (must equal the model's).
        knowledge_token: the placeholder string.
        clip_max_length: CLIP's text context (77).
        max_length: the longest LLM sequence a dialogue example may take; longer contexts lose their oldest tokens.
        max_response_length: when set, responses are cut to this many tokens and the prompt (template, knowledge
            slots and context) always gets the other `max_length - max_response_length`, the release's separate
            input and target budgets (128 and 32 tokens, plus the 32 slots); when None, the response takes up to half
            of `max_length` and the prompt whatever the response leaves.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        clip_tokenizer,
        num_query_tokens: int = 32,
        knowledge_token: str = "<knowledge>",
        clip_max_length: int = 77,
        max_length: int = 512,
        max_response_length: int | None = None,
        **kwargs,
    ):
        if knowledge_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(knowledge_token, normalized=False, special=True)], special_tokens=True)
        if tokenizer.pad_token is None:
            # Llama-2 has no pad token; its unk (or eos) is safe because padded positions carry no loss or attention.
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.num_query_tokens = num_query_tokens
        self.knowledge_token = knowledge_token
        self.clip_max_length = clip_max_length
        self.max_length = max_length
        self.max_response_length = max_response_length
        super().__init__(image_processor, tokenizer, clip_tokenizer, **kwargs)

    @property
    def knowledge_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.knowledge_token)

    @property
    def response_budget(self) -> int:
        """The most tokens a training or PPL response keeps (its eos included)."""
        return self.max_response_length if self.max_response_length is not None else self.max_length // 2

    @property
    def knowledge_placeholders(self) -> str:
        """The text of the n `<knowledge>` placeholders, written into a prompt where `K` goes."""
        return self.knowledge_token * self.num_query_tokens

    # ----------------------------------------------------------------------------------------------------------
    # CLIP side
    # ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def context_turns(context: Context) -> list[str]:
        """A dialogue context as its turns, oldest first: a string (one turn), a list of turns, or a list of chat
        messages (`{"role", "content"}`, their contents in order; VIKDF does not read the roles)."""
        if isinstance(context, str):
            return [context]
        turns = None
        if isinstance(context, Sequence):
            messages = bool(context) and all(isinstance(m, dict) and "role" in m and "content" in m for m in context)
            turns = [message["content"] for message in context] if messages else list(context)
        if turns is None or not all(isinstance(turn, str) for turn in turns):
            raise TypeError(
                "A dialogue context is a string, a list of turns or a list of chat messages; got "
                f"{type(context).__name__}: {context!r:.80}."
            )
        return turns

    @classmethod
    def join_context(cls, context: Context) -> str:
        """A context as one string: its turns (`context_turns`) joined by newlines."""
        return "\n".join(turn.strip() for turn in cls.context_turns(context))

    def clip_text_inputs(self, texts: Sequence[Context], truncation_side: str = "left") -> dict[str, torch.Tensor]:
        """`clip_input_ids`/`clip_attention_mask` (B, ≤77) with CLIP's start and end-of-text around the text.

        `truncation_side="left"` (dialogue contexts) drops the oldest tokens so that the latest turn, which the
        response answers, survives; `"right"` (captions) keeps the start, as CLIP and the release truncate.
        """
        if truncation_side not in ("left", "right"):
            raise ValueError(
                f"truncation_side={truncation_side!r}; use 'left' (dialogue contexts) or 'right' (captions)."
            )
        tokenizer = self.clip_tokenizer
        body = self.clip_max_length - 2
        # verbose=False: contexts longer than CLIP's 77 tokens are expected; they are cut just below.
        pieces = tokenizer([self.join_context(text) for text in texts], add_special_tokens=False, verbose=False)["input_ids"]
        kept = [ids[max(len(ids) - body, 0) :] if truncation_side == "left" else ids[:body] for ids in pieces]
        rows = [[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] for ids in kept]
        batch = _batch(tokenizer, rows, "right")
        return {"clip_input_ids": batch["input_ids"], "clip_attention_mask": batch["attention_mask"]}

    # ----------------------------------------------------------------------------------------------------------
    # LLM layouts
    # ----------------------------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        # verbose=False: over-long contexts are expected here; `_fit_context` cuts them to `max_length`.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def _slot_ids(self) -> list[int]:
        return [self.knowledge_token_id] * self.num_query_tokens

    def _split_ids(self, head: str, tail: str) -> tuple[list[int], list[int]]:
        """Ids of the plain text `head + tail`, split where `head`'s own ids stop agreeing with them.

        Tokenising the pieces apart would be wrong at the seam: a trailing space of `head` becomes a lone `▁` with
        SentencePiece (Llama-2, Mistral) and a lone `Ġ` with byte-level BPE, and `tail`'s first word loses its
        word-start marker. Here every token is the one plain text gets; a token that spans the seam goes to `tail`.
        """
        whole, own = self._ids(head + tail), self._ids(head)
        split = 0
        while split < min(len(whole), len(own)) and whole[split] == own[split]:
            split += 1
        return whole[:split], whole[split:]

    def _prompt_and_caption_ids(
        self, prompt: str, caption: str, max_caption_tokens: int | None
    ) -> tuple[list[int], list[int]]:
        """Ids of `{prompt} {caption}` as plain text, split into prompt and caption; the caption keeps its start."""
        caption = caption.strip()
        prompt_ids, caption_ids = self._split_ids(prompt, f" {caption}" if prompt and caption else caption)
        return prompt_ids, caption_ids[:max_caption_tokens]

    def caption_inputs(
        self,
        captions: Sequence[str],
        prompts: Sequence[str],
        padding_side: str = "right",
        max_caption_tokens: int | None = None,
        score_eos: bool = True,
    ) -> dict:
        """IACI (eq. 6): `[bos] <k>×n {prompt} {caption}[eos]`, labels on the caption (and eos with `score_eos`).

        The text after the slots is tokenised as the plain text `{prompt} {caption}` (see `_split_ids`). An empty
        prompt gives the plain BLIP-2 style generative loss of the −BVIF ablation. `max_caption_tokens` cuts long
        (web) captions, keeping their start.
        """
        eos = self.tokenizer.eos_token_id
        rows, labels = [], []
        for caption, prompt in zip(captions, prompts, strict=True):
            prompt_ids, caption_ids = self._prompt_and_caption_ids(prompt, caption, max_caption_tokens)
            prefix = self._bos() + self._slot_ids() + prompt_ids
            rows.append(prefix + caption_ids + [eos])
            labels.append([IGNORE_INDEX] * len(prefix) + caption_ids + [eos if score_eos else IGNORE_INDEX])
        return _batch(self.tokenizer, rows, padding_side, labels)

    def caption_prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of `[bos] <k>×n {prompt}`: the IACI layout (eq. 6) up to where the caption begins, which
        knowledge textualisation (§5.4) continues."""
        prompt_ids, _ = self._prompt_and_caption_ids(prompt, "", None)
        return self._bos() + self._slot_ids() + prompt_ids

    def reconstruction_inputs(
        self,
        captions: Sequence[str],
        prompts: Sequence[str],
        padding_side: str = "right",
        max_caption_tokens: int | None = None,
    ) -> dict:
        """IAKR (eq. 7–8): `[bos] {prompt} {caption} <k>×n`; the model reads the states before each slot."""
        rows = []
        for caption, prompt in zip(captions, prompts, strict=True):
            prompt_ids, caption_ids = self._prompt_and_caption_ids(prompt, caption, max_caption_tokens)
            rows.append(self._bos() + prompt_ids + caption_ids + self._slot_ids())
        return _batch(self.tokenizer, rows, padding_side)

    def dialogue_prompt_ids(self, context: Context, with_knowledge: bool = True) -> list[int]:
        """Token ids of the chat-templated prompt: knowledge slots, then the context, ready for the response.

        The slots go where the template puts the user's content, and every other token is the one the template's
        plain text (without slots) gets, so the context's first word keeps its word-start marker (`_split_ids`).
        `with_knowledge=False` gives the same template without slots, for the plain-LLM and LoRA baselines.
        """
        if self.tokenizer.chat_template is None:
            raise ValueError(
                "The LLM tokenizer has no chat template; VIKDF writes dialogue through the LLM's own template. Use a "
                "chat model (e.g. meta-llama/Llama-2-7b-chat-hf) or set tokenizer.chat_template."
            )
        prompt = self._dialogue_prompt_text(self.join_context(context), with_knowledge)
        if not with_knowledge:
            return self._ids(prompt)
        start = prompt.index(self.knowledge_placeholders)
        before, after = self._split_ids(prompt[:start], prompt[start + len(self.knowledge_placeholders) :])
        return before + self._slot_ids() + after

    def _dialogue_prompt_text(self, text: str, with_knowledge: bool) -> str:
        messages = [{"role": "user", "content": (self.knowledge_placeholders if with_knowledge else "") + text}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _template_around_context(self, with_knowledge: bool) -> tuple[str, str]:
        """The chat template's text before the context (with the slots) and after it, up to the response."""
        marker = "\x00context\x00"
        head, tail = self._dialogue_prompt_text(marker, with_knowledge).split(marker)
        return head, tail

    def without_reply_marker(self, text: str) -> str:
        """`text` without the chat template's reply marker at its start (Llama-2's `[/INST]`, ChatML's
        `assistant`).

        An LLM fine-tuned on dialogues has seen the knowledge slots open a user turn that this marker closes, so
        it may write the marker first when it reads the slots in the caption layout (§5.4); that is template text,
        not knowledge.
        """
        if self.tokenizer.chat_template is None:
            return text
        tail = self._template_around_context(with_knowledge=False)[1]
        marker = self.tokenizer.decode(self._ids(tail), skip_special_tokens=True).strip()
        return text[len(marker) :].strip() if marker and text.startswith(marker) else text

    def dialogue_response_ids(self, response: str) -> list[int]:
        """Token ids of `response` as the chat template writes an assistant turn, ending with eos.

        Templates differ around the response: Llama-2 writes `[/INST] {response} </s>`, ChatML
        `assistant\n{response}<|im_end|>`. The ids are cut from a whole templated conversation, so they are the ones
        the LLM saw in chat tuning; the bare response would teach it a boundary it never saw (with byte-level BPE,
        `was` and ` was` are different tokens). A template whose conversation does not extend its own generation
        prompt gets the bare response.
        """
        eos_id = self.tokenizer.eos_token_id
        user = [{"role": "user", "content": "x"}]
        prompt = self._ids(self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
        conversation = [*user, {"role": "assistant", "content": response.strip()}]
        full = self._ids(self.tokenizer.apply_chat_template(conversation, tokenize=False))
        turn = full[len(prompt) :] if full[: len(prompt)] == prompt else self._ids(response.strip())
        return (turn[: turn.index(eos_id)] if eos_id in turn else turn) + [eos_id]

    def _fit_context(self, context: Context, budget: int, with_knowledge: bool) -> list[int]:
        """Prompt ids within `budget` tokens, dropping the oldest context tokens first.

        An over-long prompt is cut in its ids: the template before the context, the latest context tokens and the
        template after it, tokenised apart, take exactly `budget` tokens (decoding a cut and re-encoding it could
        come back longer).
        """
        ids = self.dialogue_prompt_ids(context, with_knowledge)
        if len(ids) <= budget:
            return ids
        # The context starts after the last knowledge slot (or after the template's head without knowledge) and ends
        # where the template's tail begins; the oldest context ids go first, so the prompt takes exactly `budget`.
        head, tail = self._template_around_context(with_knowledge)
        slot_id = self.knowledge_token_id
        start = len(ids) - ids[::-1].index(slot_id) if with_knowledge else len(self._ids(head))
        overflow = len(ids) - budget
        if overflow >= len(ids) - start - len(self._ids(tail)):
            raise ValueError(
                f"max_length={self.max_length} leaves no room for the context after the template, "
                f"{self.num_query_tokens} knowledge slots and the response; raise max_length."
            )
        return ids[:start] + ids[start + overflow :]

    def dialogue_inputs(
        self,
        contexts: Sequence[Context],
        responses: Sequence[str] | None = None,
        padding_side: str | None = None,
        with_knowledge: bool = True,
    ) -> dict:
        """The dialogue layout of P(R | C, K).

        With `responses` (training and perplexity): right padding, labels on response + eos only. Without them
        (generation): the prompt alone, left padded so that every row ends where generation begins.
        """
        if responses is not None and len(responses) != len(contexts):
            raise ValueError(f"Got {len(contexts)} contexts but {len(responses)} responses.")
        rows, labels = [], []
        for index, context in enumerate(contexts):
            target = [] if responses is None else self.dialogue_response_ids(responses[index])
            target = target[: self.response_budget]
            reserved = len(target) if self.max_response_length is None else self.max_response_length
            prompt = self._fit_context(context, self.max_length - reserved, with_knowledge)
            rows.append(prompt + target)
            labels.append([IGNORE_INDEX] * len(prompt) + target)
        side = padding_side or ("left" if responses is None else "right")
        return _batch(self.tokenizer, rows, side, labels if responses is not None else None)

    def dialogue_batch(
        self, contexts: Sequence[Context], responses: Sequence[str] | None = None, with_knowledge: bool = True
    ) -> dict:
        """Model inputs for `contexts` (left padded) or, with `responses`, for scoring them (right padded, `labels`).

        With knowledge: the dialogue layout with `<knowledge>` slots plus the CLIP inputs that `K` is distilled from
        (§3.4). Without: the same chat template alone and no CLIP inputs, for the frozen-LLM and LoRA baselines
        (Table 4).
        """
        responses = None if responses is None else list(responses)
        if with_knowledge:
            return dict(self(text=list(contexts), responses=responses))
        return self.dialogue_inputs(list(contexts), responses, with_knowledge=False)

    # ----------------------------------------------------------------------------------------------------------
    # The usual processor entry points
    # ----------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        text: Context | Sequence[Context] | None = None,
        images=None,
        responses: str | Sequence[str] | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Dialogue contexts (`text`: one string, or a batch of strings or of lists of turns) → model inputs.

        Gives `input_ids`/`attention_mask` in the dialogue layout (plus `labels` when `responses` are given), the
        CLIP inputs of the joined contexts, and `pixel_values` when `images` are given.
        """
        if text is None and images is None:
            raise ValueError("VIKDFProcessor needs `text` (dialogue contexts) or `images`; both were None.")
        encoding = {}
        if text is not None:
            # A string is one context; a list is a batch whose items are strings or lists of turns.
            contexts = [text] if isinstance(text, str) else list(text)
            if isinstance(responses, str):
                responses = [responses]
            if any(not self.join_context(context).strip() for context in contexts):
                raise ValueError("Every dialogue context needs some text; got an empty context.")
            encoding.update(self.dialogue_inputs(contexts, responses, padding_side))
            encoding.update(self.clip_text_inputs(contexts))
        if images is not None:
            encoding.update(self.image_processor(images, return_tensors="pt", **kwargs))
        return BatchFeature(encoding, tensor_type=return_tensors)

    def decode_responses(self, generated: torch.LongTensor, prompt_length: int) -> list[str]:
        """The new text of each row of `model.generate(...)`, whose first `prompt_length` columns are the prompt."""
        return [text.strip() for text in self.tokenizer.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)]

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "clip_input_ids", "clip_attention_mask", "pixel_values"]


VIKDFProcessor.register_for_auto_class()

__all__ = ["VIKDFProcessor"]
