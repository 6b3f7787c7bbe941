"""Stand-in pre-training of the tiny towers (vikdf/demo/standin.py): each trains to a measured criterion, with a cap."""

from vikdf.demo.standin import Criterion, pretrain_clip, pretrain_llm
from vikdf.demo.world import iter_shard_pairs, mentioned_object


def test_clip_stops_on_its_criterion_and_reports_it(tiny_components, pair_world, tmp_path):
    paths = tiny_components("llama")
    pairs = [(image, caption) for _, image, caption in iter_shard_pairs(pair_world.train_shard_files)]
    names = pair_world.object_names
    labels = [names.index(mentioned_object(caption, names)) for _, caption in pairs]
    checked = []

    def measure(model) -> float:
        assert not model.training  # measured in eval mode, then training resumes
        checked.append(len(checked) + 1)
        return 0.5 * len(checked)  # reaches 1.0 at the second check

    result = pretrain_clip(paths.clip, pairs, max_steps=50, batch_size=16, seed=0, name_labels=labels,
                           criterion=Criterion("retrieval", measure, target=1.0, every=3))
    assert result.reached and result.steps == 6 and len(result.losses) == 6
    assert result.history == [(3, 0.5), (6, 1.0)]
    assert result.describe() == "retrieval 100 % (target ≥ 100 %, reached) after 6 steps"


def test_llm_stops_at_the_cap_when_the_criterion_is_not_reached(tiny_components, tmp_path):
    paths = tiny_components("qwen2")
    texts = ["a small zorp on the left on a grey background.", "hi! what have you been up to?"] * 8
    result = pretrain_llm(paths.llm, texts, max_steps=5, batch_size=4, seed=0,
                          criterion=Criterion("prompt copy", lambda model: 0.25, target=0.95, every=2))
    assert not result.reached and result.steps == 5
    assert [step for step, _ in result.history] == [2, 4, 5]  # every 2 steps and at the cap
    assert "NOT reached at the step cap" in result.describe() and "after 5 steps" in result.describe()
    assert all(loss == loss for loss in result.losses)  # finite


def test_criterion_callback_stops_a_trainer_run_on_its_criterion_and_never_cancels_the_stop_at_max_steps():
    import torch
    from transformers import TrainerControl, TrainerState

    from vikdf.demo.standin import CriterionCallback

    model = torch.nn.Linear(1, 1)
    for values, expected_stop, expected_history in (([0.2, 0.7], 4, [(2, 0.2), (4, 0.7)]),
                                                    ([0.2, 0.3, 0.4], 6, [(2, 0.2), (4, 0.3), (6, 0.4)])):
        measured = iter(values)
        callback = CriterionCallback(Criterion("look retrieval", lambda _: next(measured), target=0.5, every=2))
        state, control = TrainerState(max_steps=6), TrainerControl()
        for step in range(1, 9):  # the Trainer stops at step 6, its max_steps
            state.global_step = step
            control.should_training_stop = step == state.max_steps  # what the Trainer's own flow sets at the cap
            callback.on_step_end(None, state, control, model=model)
            if control.should_training_stop:
                break
        assert step == expected_stop and callback.result.history == expected_history
        assert callback.result.reached == (values[-1] >= 0.5) and callback.result.steps == expected_stop
