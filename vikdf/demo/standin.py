"""Stand-in pre-training of tiny towers, so that a CPU demo has frozen parts that carry knowledge.

VIKDF relies on *pretrained* frozen CLIP towers and a pretrained chat LLM; random tiny towers carry nothing to
distil. These short loops play the part of that pre-training on the synthetic world (`vikdf.demo.world`):
the tiny CLIP learns with `CLIPModel`'s own contrastive loss on image–caption pairs, the tiny LLM learns as a
language model on captions and on chat-templated training dialogues (its stand-in for chat tuning). Each writes
its folder back in place, so VIKDF is then built from them exactly as from hub models.
"""

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPModel, TrainerCallback
from transformers.utils import logging

from processing_vikdf import IGNORE_INDEX

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class Criterion:
    """When a stand-in has its skill: `measure(model)` ≥ `target`, checked every `every` steps (and at the cap).

    A tiny tower's skill can arrive late and suddenly (the LLM's prompt copying), so a fixed step count can stop
    just before it; training to a measured criterion, with a cap, cannot.
    """

    name: str
    measure: Callable[[torch.nn.Module], float]
    target: float
    every: int = 100


@dataclass
class StandInResult:
    """What a stand-in pre-training did: the loss per step and the criterion it reached."""

    losses: list[float]
    steps: int
    criterion: str | None = None
    value: float | None = None
    target: float | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, value) at every check

    @property
    def reached(self) -> bool:
        return self.value is not None and self.value >= self.target

    def describe(self) -> str:
        if self.criterion is None:
            return f"{self.steps} steps"
        verdict = "reached" if self.reached else "NOT reached at the step cap"
        return (f"{self.criterion} {100 * self.value:.0f} % (target ≥ {100 * self.target:.0f} %, {verdict}) "
                f"after {self.steps} steps")


def _batches(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Random index batches over `count` items without end (epochs reshuffled)."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(count), count)
        yield order[:batch_size]
        del order[:batch_size]


def _measure(model: torch.nn.Module, criterion: Criterion) -> float:
    model.eval()
    with torch.no_grad():
        value = criterion.measure(model)
    model.train()
    return value


def _fit(
    model, folder, step_loss, batches, max_steps: int, learning_rate: float, seed: int, name: str,
    criterion: Criterion | None = None, extra_parameters: Sequence[torch.nn.Parameter] = (),
) -> StandInResult:
    """AdamW over `batches` until `criterion` holds (or for `max_steps` without one, or at the cap), then save
    `model` back to `folder`."""
    optimizer = torch.optim.AdamW([*model.parameters(), *extra_parameters], lr=learning_rate, weight_decay=0.01)
    torch.manual_seed(seed)
    model.train()
    result = StandInResult(losses=[], steps=0)
    if criterion is not None:
        result.criterion, result.target = criterion.name, criterion.target
    for step, batch in enumerate(tqdm(itertools.islice(batches, max_steps), total=max_steps, desc=f"stand-in {name}",
                                      leave=False), start=1):
        loss = step_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        result.losses.append(loss.item())
        result.steps = step
        if criterion is not None and (step % criterion.every == 0 or step == max_steps):
            result.value = _measure(model, criterion)
            result.history.append((step, result.value))
            logger.info(f"stand-in {name}, step {step}: {criterion.name} {result.value:.3f}")
            if result.reached:
                break
    model.save_pretrained(folder)
    return result


class CriterionCallback(TrainerCallback):
    """The same rule for a `Trainer` run (the demo's VIKDF pre-training): `criterion` is measured every
    `criterion.every` steps and at the last step, and training stops once it holds; `result` says what was reached."""

    def __init__(self, criterion: Criterion):
        self.criterion = criterion
        self.result = StandInResult(losses=[], steps=0, criterion=criterion.name, target=criterion.target)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.criterion.every and state.global_step < state.max_steps:
            return
        self.result.steps = state.global_step
        self.result.value = _measure(model, self.criterion)
        self.result.history.append((state.global_step, self.result.value))
        logger.info(f"step {state.global_step}: {self.criterion.name} {self.result.value:.3f}")
        if self.result.reached:  # never unset: the Trainer's own stop at max_steps is set by then too
            control.should_training_stop = True


def pretrain_clip(
    folder: str | Path,
    pairs: Sequence[tuple[Image.Image, str]],
    max_steps: int = 300,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    name_labels: Sequence[int] | None = None,
    criterion: Criterion | None = None,
) -> StandInResult:
    """Contrastive image–text training of the CLIP in `folder` on `pairs`.

    `name_labels` (one class per pair, e.g. the object its caption names) adds a cross-entropy of a linear head on
    the pooled text features, discarded afterwards: the text tower then tells those words apart even where the
    images do not, as a real CLIP's text tower distinguishes most words it has read.
    """
    model = CLIPModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_processor = CLIPImageProcessor.from_pretrained(folder)
    pixels = image_processor([image for image, _ in pairs], return_tensors="pt")["pixel_values"]
    texts = tokenizer([caption for _, caption in pairs], padding=True, return_tensors="pt")
    head = None
    if name_labels is not None:
        labels = torch.tensor(list(name_labels))
        torch.manual_seed(seed)
        head = torch.nn.Linear(model.config.projection_dim, int(labels.max()) + 1)

    def step_loss(batch: list[int]) -> torch.Tensor:
        index = torch.tensor(batch)
        output = model(
            input_ids=texts["input_ids"][index], attention_mask=texts["attention_mask"][index],
            pixel_values=pixels[index], return_loss=True,
        )
        if head is None:
            return output.loss
        # Normalised features, so the head's logits are scaled like CLIP's own similarities.
        names = torch.nn.functional.cross_entropy(10 * head(output.text_embeds), labels[index])
        return output.loss + names

    return _fit(model, folder, step_loss, _batches(len(pairs), batch_size, seed), max_steps, learning_rate, seed,
                "CLIP", criterion, () if head is None else list(head.parameters()))


def chat_formatted(tokenizer, context: Sequence[str], response: str) -> str:
    """A dialogue in the LLM's chat template, as a chat-tuned LLM has seen dialogue."""
    messages = [{"role": "user", "content": "\n".join(context)}, {"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def pretrain_llm(
    folder: str | Path,
    texts: Sequence[str],
    max_steps: int = 400,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    max_length: int = 96,
    seed: int = 0,
    criterion: Criterion | None = None,
) -> StandInResult:
    """Causal language-model training of the LLM in `folder` on `texts`, until `criterion` holds."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"][:max_length] for text in texts]

    def step_loss(batch: list[int]) -> torch.Tensor:
        rows = [encoded[i] for i in batch]
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([row + [tokenizer.pad_token_id or 0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return model(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, IGNORE_INDEX)).loss

    return _fit(model, folder, step_loss, _batches(len(encoded), batch_size, seed), max_steps, learning_rate, seed,
                "LLM", criterion)


__all__ = ["Criterion", "StandInResult", "pretrain_clip", "pretrain_llm", "chat_formatted"]
