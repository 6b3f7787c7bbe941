"""Pre-training with `VIKDFPretrainTrainer` / `train_pretrain.py` on the tiny model and real webdataset shards:
gradient accumulation, ablation switches, resuming from a checkpoint, and a short run that learns."""

import itertools
import math

import pytest
import torch
from pretrain_helpers import (
    HEAD_PARTS,
    SWITCH_OBJECTIVE,
    CaptureGradients,
    disable_dropout,
    load_pairs,
    mixed_source_specs,
    pretrain_argv,
    set_dropout,
    slice_batch,
    trainable_state,
)
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, Trainer, TrainerCallback

import train_pretrain
from vikdf.training.arguments import PretrainTrainingArguments
from vikdf.training import trainers
from vikdf.data import pairs
from vikdf.data.collators import PretrainCollator
from vikdf.data.pairs import build_image_transform, build_pair_dataset
from vikdf.demo.world import iter_shard_pairs
from vikdf.training.losses import tim_similarity
from vikdf.training.trainers import OBJECTIVES, VIKDFPretrainTrainer, stream_state_name

LOSS_KEYS = tuple(f"loss_{name}" for name in OBJECTIVES)


def make_trainer(model, processor, output_dir, train_dataset, data_collator, callbacks=(), **arguments):
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        warmup_steps=0,
        precision="fp32",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    settings.update(arguments)
    return VIKDFPretrainTrainer(
        model=model,
        args=PretrainTrainingArguments(**settings),
        train_dataset=train_dataset,
        data_collator=data_collator,
        processing_class=processor,
        callbacks=list(callbacks),
    )


def logged_steps(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# --------------------------------------------------------------------------------------------------- schedule


def test_default_schedule_warms_up_linearly_over_10_percent_then_stays_constant(tmp_path):
    """Paper §4.2: linear warm-up over the first 10 %; the release then held the rate (constant_with_warmup)."""
    parser = HfArgumentParser(PretrainTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--precision", "fp32", "--report_to", "none"]
    )
    assert args.lr_scheduler_type == "constant_with_warmup" and args.warmup_steps == 0.1
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    rates = []
    for _ in range(100):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    peak = args.learning_rate
    assert rates[:11] == pytest.approx([peak * step / 10 for step in range(11)])
    assert rates[10:] == pytest.approx([peak] * 90)


# --------------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("accumulation", [4])
def test_accumulating_a_repeated_batch_logs_and_steps_like_one_batch(
    build_tiny, tiny_components, pair_world, tmp_path, accumulation
):
    """The same micro-batch, lr 0: accumulating it 4 times logs the same objectives and total, and gives the same
    gradient as one micro-batch (no factor of 4 anywhere, TIM included)."""
    # Write the component folders first: doing so inside the first build_tiny draws from the seeded global RNG,
    # which would give that first model different head weights from the second.
    tiny_components("llama")
    runs = {}
    for steps in (1, accumulation):
        model, processor = build_tiny()
        disable_dropout(model)
        batch = PretrainCollator(processor, model.config)(load_pairs(pair_world, 4))
        grads = CaptureGradients(model)
        trainer = make_trainer(
            model, processor, tmp_path / f"ga{steps}", list(range(64)), lambda _examples, b=batch: b, [grads],
            learning_rate=0.0, max_steps=2, gradient_accumulation_steps=steps, max_grad_norm=0.0,
        )
        trainer.train()
        runs[steps] = (logged_steps(trainer), grads.steps)

    (logs_one, grads_one), (logs_many, grads_many) = runs[1], runs[accumulation]
    assert len(logs_one) == len(logs_many) == 2
    for one, many in zip(logs_one, logs_many, strict=True):
        for key in ("loss", *LOSS_KEYS):
            assert math.isfinite(one[key])
            assert many[key] == pytest.approx(one[key], rel=0.01), key
    for one, many in zip(grads_one, grads_many, strict=True):
        for name, grad in one.items():
            if grad is None:
                assert many[name] is None, name
            else:
                assert torch.allclose(many[name], grad, rtol=1e-3, atol=1e-7), name
    assert any(g is not None and g.abs().sum() > 0 for g in grads_one[0].values())


def test_two_accumulated_micro_batches_give_the_gradient_of_one_large_batch(build_tiny, pair_world, tmp_path):
    """2 × 4 accumulated = 1 × 8 for the objectives normalised by item counts (TIM off: its negatives are the
    micro-batch). The two halves mask different numbers of tokens, so a per-micro-batch mean would differ."""
    model, processor = build_tiny(use_tim=False)
    disable_dropout(model)
    # seed 1: its draws give the precondition below
    batch = PretrainCollator(processor, model.config, seed=1)(load_pairs(pair_world, 8))
    halves = [slice_batch(batch, 0, 4), slice_batch(batch, 4, 8)]
    # Precondition: the halves hold different numbers of masked tokens and of caption tokens, so normalising each
    # micro-batch by its own count (instead of the accumulated batch's) would give a different gradient.
    masked = [int((h["clip_mlm_labels"] != -100).sum()) for h in halves]
    caption_tokens = [int((h["llm_labels"][:4, 1:] != -100).sum()) for h in halves]
    assert masked[0] != masked[1] and caption_tokens[0] != caption_tokens[1], (masked, caption_tokens)

    def accumulated_gradients(micro_batches):
        trainer = make_trainer(
            model, processor, tmp_path / f"ga{len(micro_batches)}", [], None,
            gradient_accumulation_steps=len(micro_batches),
        )
        model.zero_grad(set_to_none=True)
        num_items = trainer._get_num_items_in_batch(micro_batches, trainer.args.device)
        trainer.current_gradient_accumulation_steps = len(micro_batches)
        losses = [trainer.training_step(model, micro_batch, num_items) for micro_batch in micro_batches]
        return sum(losses), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_large, grads_large = accumulated_gradients([batch])
    loss_accumulated, grads_accumulated = accumulated_gradients(halves)

    assert loss_accumulated.item() == pytest.approx(loss_large.item(), rel=1e-4)
    assert grads_large.keys() == grads_accumulated.keys()
    for part in ("iq_former", "query_tokens", "tamim_decoder", "iamtm_head", "iakr_head", "language_projection"):
        assert any(name.startswith(part) for name in grads_large), part
    for name, grad in grads_large.items():
        assert torch.allclose(grads_accumulated[name], grad, rtol=1e-3, atol=1e-6), name


def test_dataloader_workers_draw_their_own_crops_and_masks(build_tiny, pair_world):
    """Each DataLoader worker holds a copy of the collator (and of its batch counter): the n-th batches of two
    workers must not share crops and masks."""
    model, processor = build_tiny()
    dataset = build_pair_dataset("wds:" + pair_world.train_shards, seed=0)
    loader = DataLoader(dataset, batch_size=4, collate_fn=PretrainCollator(processor, model.config), num_workers=2)
    batches = list(itertools.islice(loader, 2))  # batch 0 from worker 0, batch 1 from worker 1
    assert not torch.equal(batches[0]["pixel_mask"], batches[1]["pixel_mask"])


# --------------------------------------------------------------------------------------------------- ablations


@pytest.mark.parametrize("switch", [None, *HEAD_PARTS])
def test_ablation_switch_removes_its_head_from_gradients_and_logs(build_tiny, pair_world, tmp_path, switch):
    overrides = {} if switch is None else {switch: False}
    model, processor = build_tiny(**overrides)
    grads = CaptureGradients(model)
    trainer = make_trainer(
        model, processor, tmp_path, load_pairs(pair_world, 8), PretrainCollator(processor, model.config), [grads],
        learning_rate=1e-4, max_steps=1,
    )
    trainer.train()

    (step,) = grads.steps
    (logged,) = logged_steps(trainer)
    for head, parts in HEAD_PARTS.items():
        head_grads = [grad for name, grad in step.items() if name.split(".")[0] in parts]
        assert head_grads, head
        if head == switch:
            assert all(grad is None for grad in head_grads), f"{head} off but its head got a gradient"
            assert f"loss_{SWITCH_OBJECTIVE[head]}" not in logged
        else:
            assert all(grad is not None for grad in head_grads), f"{head} on but part of its head got no gradient"
            assert any(grad.abs().sum() > 0 for grad in head_grads), head
            assert math.isfinite(logged[f"loss_{SWITCH_OBJECTIVE[head]}"])
    # IACI and the shared parts always train.
    assert math.isfinite(logged["loss_iaci"])
    for part in ("query_tokens", "iq_former", "language_projection"):
        assert any(step[name] is not None for name in step if name.split(".")[0] == part), part


# --------------------------------------------------------------------------------------------------- resume


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class _CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


BATCH_KEYS = ("pixel_values", "pixel_mask", "clip_input_ids", "clip_masked_input_ids", "llm_input_ids", "llm_labels")


def _main_with_callbacks(monkeypatch, argv, *callbacks, batches: list | None = None, decoded: list | None = None):
    """`train_pretrain.main(argv, callbacks)`, with dropout 0.1 in the IQ-Former
    (BERT's rate; the tiny components have none) so that resuming must also restore the dropout RNG. `batches`
    collects each training step's inputs, `decoded` the (source, key) of every image the pair stream decodes."""
    build_model = train_pretrain.build_model
    make_pair = pairs._make_pair

    def build_with_dropout(*args, **kwargs):
        model, processor = build_model(*args, **kwargs)
        set_dropout(model.iq_former, 0.1)
        return model, processor

    def counting_make_pair(record, skips):
        pair = make_pair(record, skips)
        if pair is not None and decoded is not None:
            decoded.append((record.source, record.key))
        return pair

    class Trainer(VIKDFPretrainTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            if batches is not None:
                batches.append({key: inputs[key].clone() for key in BATCH_KEYS})
            return super().training_step(model, inputs, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_pretrain, "build_model", build_with_dropout)
        patch.setattr(trainers, "VIKDFPretrainTrainer", Trainer)  # main imports it when it runs
        patch.setattr(pairs, "_make_pair", counting_make_pair)
        return train_pretrain.main(argv, callbacks=list(callbacks))


def test_resumed_run_continues_the_stream_without_reading_it_again(tiny_components, pair_world, tmp_path, monkeypatch):
    """Resume at step 4 of 8 on a wds + coco + hf mix with a shuffle buffer: steps 5-8 get exactly the batches of
    the uninterrupted run, the resumed stream decodes only its saved buffer and what the uninterrupted stream
    decoded after step 4 (no consumed pair), and the final weights are bit-identical."""
    buffer = 10
    sources = mixed_source_specs(pair_world, tmp_path / "data")

    def argv(output_dir, **extra):
        return pretrain_argv(
            tiny_components("llama"), sources, output_dir,
            max_steps=8, save_steps=4, logging_steps=2, learning_rate=1e-3, shuffle_buffer=buffer, **extra,
        )

    batches_a, decoded_a = [], []
    uninterrupted = _main_with_callbacks(monkeypatch, argv(tmp_path / "a"), batches=batches_a, decoded=decoded_a)

    decoded_b = []
    stopped = _main_with_callbacks(monkeypatch, argv(tmp_path / "b"), _StopAt(4), decoded=decoded_b)
    checkpoint = tmp_path / "b" / "checkpoint-4"
    assert stopped.state.global_step == 4 and (checkpoint / stream_state_name(0)).is_file()
    weights_at_4 = trainable_state(stopped.model)

    counter, batches_r, decoded_r = _CountSteps(), [], []
    resumed = _main_with_callbacks(
        monkeypatch, argv(tmp_path / "b", resume_from_checkpoint=checkpoint), counter,
        batches=batches_r, decoded=decoded_r,
    )
    assert counter.steps == [5, 6, 7, 8]  # it really resumed: only the last four steps ran

    assert {source for source, _ in decoded_b} == {"train", "coco", "folder"}  # every kind was read before step 4
    assert len(batches_r) == 4
    for step, (expected, got) in enumerate(zip(batches_a[4:], batches_r, strict=True), start=5):
        for key in BATCH_KEYS:
            assert torch.equal(got[key], expected[key]), (step, key)
    # Re-decoded: the saved buffer (pairs decoded before the checkpoint, not yet yielded), then exactly what the
    # uninterrupted stream decoded after step 4. Reading the stream again would decode all of decoded_b first.
    assert decoded_a[: len(decoded_b)] == decoded_b
    assert decoded_r[buffer:] == decoded_a[len(decoded_b) :]
    assert set(decoded_r[:buffer]) <= set(decoded_b) and len(decoded_r) < len(decoded_a)
    assert len(decoded_r) == buffer + len(decoded_a) - len(decoded_b)

    final_a, final_b = trainable_state(uninterrupted.model), trainable_state(resumed.model)
    assert final_a.keys() == final_b.keys()
    moved = max((final_a[name] - weights_at_4[name]).abs().max().item() for name in final_a)
    assert moved > 1e-4, "steps 5-8 did not change the weights: the comparison below would prove nothing"
    for name, weight in final_a.items():
        assert torch.equal(final_b[name], weight), name
    # The resumed half also logged what the uninterrupted run logged at the same steps.
    logged_a = {e["step"]: e for e in logged_steps(uninterrupted)}
    for entry in logged_steps(resumed):
        if entry["step"] > 4:
            for key in ("loss", *LOSS_KEYS):
                assert entry[key] == logged_a[entry["step"]][key], (entry["step"], key)


# --------------------------------------------------------------------------------------------------- learning


TRAIN_STEPS = 300


@pytest.fixture(scope="module")
def trained(tiny_components, pair_world, tmp_path_factory):
    """One short run on the 32 pairs of the first shard, shared by the loss and retrieval checks.

    A batch of 32 holds (nearly) every pair, so TIM sees all negatives each step; the tiny CLIP towers are random
    and frozen, and the IQ-Former's output starts almost independent of its input, so TIM needs a few hundred steps
    (recall@1 ≈ 0.25 after 300 steps, ≈ 0.35 after 400; chance is 1/32; the test asks for 5× chance).
    """
    output_dir = tmp_path_factory.mktemp("learn")
    argv = pretrain_argv(
        tiny_components("llama"), f"wds:{pair_world.train_shard_files[0]}", output_dir,
        max_steps=TRAIN_STEPS, per_device_train_batch_size=32, learning_rate=5e-3, logging_steps=10,
        save_strategy="no", shuffle_buffer=32,
    )
    return train_pretrain.main(argv)


def test_every_objective_falls(trained):
    history = logged_steps(trained)
    assert len(history) == TRAIN_STEPS // 10
    window = max(1, len(history) // 10)
    for key in LOSS_KEYS:
        first = sum(entry[key] for entry in history[:window]) / window
        last = sum(entry[key] for entry in history[-window:]) / window
        assert last < first, f"{key}: {first:.4f} -> {last:.4f}"


def test_text_to_image_retrieval_beats_chance(trained, pair_world):
    model, processor = trained.model.eval(), trained.processing_class
    pairs = [
        {"image": image, "caption": caption} for _, image, caption in iter_shard_pairs(pair_world.train_shard_files[:1])
    ]
    assert len(pairs) == 32
    transform = build_image_transform(model.config.clip_config.vision_config.image_size, train=False)
    with torch.no_grad():
        clip = processor.clip_text_inputs([pair["caption"] for pair in pairs], truncation_side="right")
        text_knowledge = model.get_text_knowledge(clip["clip_input_ids"], clip["clip_attention_mask"])
        image_knowledge = model.get_image_knowledge(torch.stack([transform(pair["image"]) for pair in pairs]))
        text, image = model.tim_embeddings(text_knowledge, image_knowledge)
        similarity = tim_similarity(text, image)
    recall_at_1 = (similarity.argmax(dim=1) == torch.arange(len(pairs))).float().mean().item()
    chance = 1 / len(pairs)
    assert recall_at_1 >= 5 * chance, f"text→image recall@1 {recall_at_1:.3f}, chance {chance:.3f}"
