"""Stand-in pre-training of tiny towers, so that a CPU demo has frozen parts that carry knowledge.

VIKDF relies on *pretrained* frozen CLIP towers and a pretrained chat LLM; random tiny towers carry nothing to
distil. These short loops play the part of that pre-training on the synthetic world (`vikdf.data.synthetic`):
the tiny CLIP learns with `CLIPModel`'s own contrastive loss on image–caption pairs, the tiny LLM learns as a
language model on captions and on chat-templated training dialogues (its stand-in for chat tuning). Each writes
its folder back in place, so VIKDF is then built from them exactly as from hub models.
"""

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPModel
from transformers.utils import logging

logger = logging.get_logger(__name__)


def _batches(count: int, batch_size: int, steps: int, seed: int):
    """`steps` random index batches over `count` items (epochs reshuffled)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(count), count)
        yield order[:batch_size]
        del order[:batch_size]


def _fit(model, folder, step_loss, batches, steps: int, learning_rate: float, seed: int, name: str) -> list[float]:
    """AdamW over `batches`, then save `model` back to `folder`; returns the loss per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for batch in tqdm(batches, total=steps, desc=f"stand-in {name}", leave=False):
        loss = step_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(folder)
    return losses


def pretrain_clip(
    folder: str | Path,
    pairs: Sequence[tuple[Image.Image, str]],
    steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Contrastive image–text training of the CLIP in `folder` on `pairs`; returns the loss per step."""
    model = CLIPModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = CLIPImageProcessor.from_pretrained(folder)
    pixels = image_processor([image for image, _ in pairs], return_tensors="pt")["pixel_values"]
    texts = tokenizer([caption for _, caption in pairs], padding=True, return_tensors="pt")

    def step_loss(batch: list[int]) -> torch.Tensor:
        index = torch.tensor(batch)
        return model(
            input_ids=texts["input_ids"][index], attention_mask=texts["attention_mask"][index],
            pixel_values=pixels[index], return_loss=True,
        ).loss

    return _fit(model, folder, step_loss, _batches(len(pairs), batch_size, steps, seed), steps, learning_rate, seed, "CLIP")


def chat_formatted(tokenizer, context: Sequence[str], response: str) -> str:
    """A dialogue in the LLM's chat template, as a chat-tuned LLM has seen dialogue."""
    messages = [{"role": "user", "content": "\n".join(context)}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def pretrain_llm(
    folder: str | Path,
    texts: Sequence[str],
    steps: int = 400,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    max_length: int = 96,
    seed: int = 0,
) -> list[float]:
    """Causal language-model training of the LLM in `folder` on `texts`; returns the loss per step."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] for text in texts]

    def step_loss(batch: list[int]) -> torch.Tensor:
        rows = [encoded[i] for i in batch]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([row + [tokenizer.pad_token_id or 0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return model(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100)).loss

    return _fit(model, folder, step_loss, _batches(len(encoded), batch_size, steps, seed), steps, learning_rate, seed, "LLM")


__all__ = ["pretrain_clip", "pretrain_llm", "chat_formatted"]
