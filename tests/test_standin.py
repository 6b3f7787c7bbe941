"""Stand-in pre-training of the tiny towers (vikdf/standin.py): each trains to a measured criterion, with a cap."""

from vikdf.data.synthetic import OBJECT_KINDS, iter_shard_pairs, mentioned_object
from vikdf.standin import Criterion, pretrain_clip, pretrain_llm

NAMES = [kind.name for kind in OBJECT_KINDS]


def test_clip_stops_on_its_criterion_and_reports_it(tiny_components, pair_world, tmp_path):
    paths = tiny_components("llama")
    pairs = [(image, caption) for _, image, caption in iter_shard_pairs(pair_world.train_shard_files)]
    labels = [NAMES.index(mentioned_object(caption)) for _, caption in pairs]
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
