"""The five pre-training losses of one fixed tiny case equal the values stored when the pre-training step still ran
in the trainer (before the model's `forward` returned `VIKDFPretrainingOutput`): moving the step changed no loss,
and neither does any of the slower passes the step benchmark times.

The stored values were computed by `VIKDFPretrainTrainer.compute_loss` at commit fe6bcf3 on this case: tiny Llama
components written under seed 0 and the VIKDF built from them right after, as a session's first `build_tiny` does
(the session's shared components depend on which test wrote them first), dropout off, and `PretrainCollator(seed=0)`
over `CASE_CAPTIONS` with seeded pixels.
"""

import pytest
import torch
from pretrain_helpers import disable_dropout

from conftest import TINY_OVERRIDES

from modeling_vikdf import PretrainingPasses
from vikdf.training.arguments import PretrainTrainingArguments
from vikdf.training.components import build_vikdf_from_components
from vikdf.data.collators import PretrainCollator
from vikdf.testing import write_tiny_components
from vikdf.training.trainers import VIKDFPretrainTrainer

CASE_CAPTIONS = (
    "a red zorp sits on a blue box",
    "two dogs run in the park",
    "a small green bird on a branch",
    "the yellow car is parked by the sea",
)
# Micro-batch means, as logged (`loss_<name>`), and the weighted total of eq. 5 + eq. 9.
STORED_LOSSES = {
    "loss_tim": 1.3864119052886963,
    "loss_tamim": 0.8047834038734436,
    "loss_iamtm": 6.104518890380859,
    "loss_iaci": 6.139404296875,
    "loss_iakr": 1.0239191055297852,
    "total": 8.726430892944336,
}


def stored_case_losses(folder, passes: PretrainingPasses | None = None) -> dict[str, float]:
    """The case's logged losses and total; `passes` switches the model's forward to a slower way of computing them."""
    torch.manual_seed(0)
    paths = write_tiny_components(folder / "components", "llama")
    model, processor = build_vikdf_from_components(str(paths.clip), str(paths.bert), str(paths.llm), **TINY_OVERRIDES)
    disable_dropout(model).eval()
    model.pretraining_passes = passes or PretrainingPasses()
    generator = torch.Generator().manual_seed(0)
    examples = [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "caption": c} for c in CASE_CAPTIONS]
    batch = PretrainCollator(processor, model.config, seed=0)(examples)
    trainer = VIKDFPretrainTrainer(
        model=model,
        args=PretrainTrainingArguments(output_dir=str(folder / "run"), precision="fp32", report_to="none", max_steps=1),
        processing_class=processor,
    )
    with torch.no_grad():
        total, logged = trainer.compute_loss(model, batch, return_outputs=True)
    return {**{name: value.item() for name, value in logged.items()}, "total": total.item()}


def test_the_five_losses_equal_the_stored_ones(tmp_path):
    losses = stored_case_losses(tmp_path)
    assert losses.keys() == STORED_LOSSES.keys()
    for name, stored in STORED_LOSSES.items():
        assert losses[name] == pytest.approx(stored, rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("switch", ["one_vision_pass", "one_llm_pass", "caption_logits_only",
                                    "masked_token_logits_only"])
def test_each_slower_pass_the_benchmark_times_gives_the_same_losses(tmp_path, switch):
    """benchmarks/bench_pretrain_step.py times each `PretrainingPasses` switch against the default: a comparison of
    speed only if the losses are the same."""
    losses = stored_case_losses(tmp_path, PretrainingPasses(**{switch: False}))
    for name, stored in STORED_LOSSES.items():
        assert losses[name] == pytest.approx(stored, rel=1e-5, abs=1e-6), name
