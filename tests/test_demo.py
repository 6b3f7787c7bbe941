"""The main job at a smaller setting: every stage runs, writes its outputs, and reports finite numbers."""

import json
import math
from pathlib import Path

import pytest
from transformers import HfArgumentParser

import demo
import train_dialogue
from vikdf.training.arguments import DialogueTrainingArguments

ROOT = Path(__file__).resolve().parents[1]


def test_demo_smoke_preset_runs_end_to_end(tmp_path, capsys, demo_cache):
    summary = demo.main(["--preset", "smoke", "--output_dir", str(tmp_path / "demo"), "--cache_dir", str(demo_cache)])
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert "| System | PPL | BLEU-1 | ROUGE-L | Average | Extrema | Greedy |" in printed
    assert "GloVe 6B 50d" in printed
    assert "TIM text→image recall@1 on 100 held-out pairs" in printed
    assert [line for line in printed.splitlines() if line.startswith("[")][-1].endswith("6/6 report")
    assert list(summary["stage_seconds"]) == ["world", "stand_in_towers", "pretrain", "dialogue_fine_tuning",
                                              "evaluation", "report"]
    assert (out / "loss_curves.png").stat().st_size > 0
    # A later demo deletes exactly these names: the run writes no other.
    assert all(demo.DEMO_ENTRIES.fullmatch(p.name) or p.name in (demo.DEMO_MARKER, demo.DEMO_LOCK) for p in out.iterdir())
    for split in ("eval", "eval_seen"):
        for system in ("llm", "lora", "no_pretrain", "vikdf"):
            assert (out / split / system / "predictions.jsonl").exists() and (out / split / system / "metrics.md").exists()
    count = demo.PRESETS["smoke"]["num_eval_dialogues"]
    assert len((out / "eval" / "vikdf" / "knowledge.jsonl").read_text().splitlines()) == count  # every test dialogue
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # The smoke preset runs every row: the main ones, ⅛ of the dialogues, pre-training only, the causal check and
    # the Table 3 ablations, each its own pre-training run followed by the same fine-tuning.
    expected = [demo.FROZEN_LLM, demo.LORA, demo.NO_PRETRAIN, demo.VIKDF,
                "VIKDF −TIM", "VIKDF −TAMIM", "VIKDF −IAMTM", "VIKDF −BVIF", demo.NO_PRETRAIN + demo.LOW, demo.VIKDF + demo.LOW, demo.PRETRAIN_ONLY, demo.SHUFFLED,
                demo.queries_row(4), demo.queries_row(16), "VIKDF, zero knowledge"]
    assert list(summary["systems"]) == expected
    for name in expected:
        assert f"| {name} |" in printed
    for suffix in ("−TIM", "−TAMIM", "−IAMTM", "−BVIF"):
        assert (out / f"pretrain{suffix}" / "model.safetensors").exists() and (out / f"vikdf{suffix}").is_dir()
    for name, metrics in summary["systems"].items():
        for key in ("ppl", "bleu_1", "rouge_l", "embedding_average", "vector_extrema", "greedy_matching",
                    "distinct_1", "distinct_2", "knowledge_accuracy", "knowledge_accuracy_seen"):
            assert math.isfinite(metrics[key]), (name, key)
        low, high = metrics["knowledge_accuracy_interval"]
        assert 0.0 <= low <= metrics["knowledge_accuracy"] <= high <= 1.0, name
    assert "95 % interval from a bootstrap over the 12 image-only kinds" in printed
    # Fig. 7's driver: n = 4 and 16 each pre-trained and fine-tuned (n = 8 is VIKDF), with intervals over kinds.
    assert "Fig. 7: VIKDF with n query vectors" in printed
    assert list(summary["figure7"]) == ["4", "8", "16"]
    for n, columns in summary["figure7"].items():
        assert list(columns) == ["knowledge_accuracy", "bleu_1", "rouge_l"]
        for value, low, high in columns.values():
            assert math.isfinite(value) and low <= value + 1e-9 and value <= high + 1e-9, (n, columns)
        assert f"| {n} | {columns['knowledge_accuracy'][0]:.1f} [" in printed
    assert summary["figure7"]["8"]["bleu_1"][0] == pytest.approx(summary["systems"][demo.VIKDF]["bleu_1"], abs=1e-6)
    assert (out / "pretrain_n16" / "config.json").exists()
    assert json.loads((out / "vikdf_n4" / "config.json").read_text())["num_query_tokens"] == 4
    assert 0.0 <= summary["systems"][demo.PRETRAIN_ONLY]["textualised_accuracy"] <= 1.0
    for stand_in in summary["stand_ins"].values():
        assert stand_in["steps"] >= 1 and 0.0 <= stand_in["value"] <= 1.0 and stand_in["criterion"]
        assert stand_in["reached"] == (stand_in["value"] >= stand_in["target"])
    stage_two = [line for line in printed.splitlines() if "2/6 stand-in towers" in line][0]
    for stand_in in summary["stand_ins"].values():  # the demo prints the criterion each stand-in reached
        assert f"{stand_in['criterion']} {100 * stand_in['value']:.0f} %" in stage_two
    assert all(0.0 <= rate <= 1.0 for rate in summary["llm_prompt_use"].values())
    # VIKDF pre-training runs to its criterion with a cap, and the demo prints what it reached.
    pretraining = summary["pretraining_criterion"]
    assert 1 <= pretraining["steps"] <= demo.PRESETS["smoke"]["pretrain_steps"] and 0.0 <= pretraining["value"] <= 1.0
    assert pretraining["reached"] == (pretraining["value"] >= pretraining["target"])
    stage_three = [line for line in printed.splitlines() if "3/6 VIKDF pre-training" in line][0]
    assert f"image-only look retrieval (TIM top-5) {100 * pretraining['value']:.0f} %" in stage_three
    # TIM recall@1 of a caption's own image is reported, not asserted: three captions in four name the object
    # alone ("a zorp."), so many held-out images fit a caption equally well.
    assert 0.0 <= summary["tim_recall_at_1"] <= 1.0


def test_verdict_counts_a_gain_only_when_its_interval_over_kinds_excludes_zero():
    kinds = [f"kind{i}" for i in range(12)]
    right = {"all": [(k, True) for k in kinds for _ in range(6)],
             "none": [(k, False) for k in kinds for _ in range(6)],
             "one_kind": [(k, k == "kind0") for k in kinds for _ in range(6)]}
    assert demo.compare("X", "all", "none", right).startswith("X helped")
    # One kind right: +8.3 points, but over 72 dialogues that is one name, and the interval over kinds includes 0.
    verdict = demo.compare("X", "one_kind", "none", right)
    assert "did NOT measurably help" in verdict and "+8.3 points" in verdict and "over 12 kinds" in verdict


def test_projection_only_switch_fine_tunes_on_the_projections_own_schedule():
    full = demo.PRESETS["full"]
    paper = demo.dialogue_schedule(full, projection_only=False)
    assert paper == ["--num_train_epochs", "8", "--learning_rate", "0.003"]  # the README's 8 epochs at 3e-3
    switched = demo.dialogue_schedule(full, projection_only=True)
    assert switched == ["--num_train_epochs", "24", "--learning_rate", "0.01", "--freeze_iq_former", "true"]
    parser = HfArgumentParser((train_dialogue.DialogueModelArguments, DialogueTrainingArguments))
    model_args, training_args = parser.parse_args_into_dataclasses(
        args=["--model_name_or_path", "x", "--output_dir", "o", *switched])  # flags train_dialogue.py knows
    assert model_args.freeze_iq_former and training_args.num_train_epochs == 24 and training_args.learning_rate == 0.01


def verdict_lines(stem: Path, targets: list[dict]) -> list[str]:
    """The benchmark's verdicts over all runs, with their figures, as its results file printed them."""
    printed = stem.with_suffix(".md").read_text().splitlines()
    lines = printed[printed.index("### Targets") + 2:][:len(targets)]
    for check, line in zip(targets, lines, strict=True):
        assert line.startswith(f"- {'MET' if check['met'] else 'NOT met'}: {check['target']} ("), line
    return lines


def quoted_run(readme: str, results_file: Path) -> dict:
    """The systems of a `demo_run.py` results file, after checking that the README quotes their table rows and
    intervals over kinds as the demo printed them."""
    summary = json.loads(results_file.read_text())["summary"]
    for name, row in summary["systems"].items():
        low, high = row["knowledge_accuracy_interval"]
        for line in (demo.table_row(name, row),
                     f"  {name}: {demo._percent(row['knowledge_accuracy'])} [{100 * low:.1f}, {100 * high:.1f}]"):
            assert line in readme, line
    return summary["systems"]


def test_readme_quotes_the_multi_seed_benchmark_and_the_default_run():
    """The README's demo tables are the benchmarks': the seed benchmark's mean ± sd table line for line and every
    target verdict it reached, and the default run (`python demo.py`: llama, seed 0) as `demo_run.py` printed it,
    which measured what the seed benchmark's own llama seed-0 run did (that benchmark predates the GloVe columns)."""
    readme = (ROOT / "README.md").read_text()
    results = json.loads((ROOT / "experiments" / "results" / "demo_seeds_full_cpu.json").read_text())
    for line in results["readme_table"]:
        assert line in readme, line
    default = quoted_run(readme, ROOT / "experiments" / "results" / "demo_default_cpu.json")
    assert list(default) == [demo.FROZEN_LLM, demo.NO_PRETRAIN, demo.VIKDF, demo.SHUFFLED]
    (seed_zero,) = [run for run in results["runs"] if run["llm_family"] == "llama" and run["seed"] == 0]
    for name, row in default.items():
        for key in ("ppl", "bleu_1", "rouge_l", "distinct_1", "distinct_2", "knowledge_accuracy",
                    "knowledge_accuracy_interval", "knowledge_accuracy_seen", "textualised_accuracy"):
            expected = seed_zero["systems"][name][key]
            assert row[key] == (expected if expected is None else pytest.approx(expected, rel=1e-12)), (name, key)
    runs = {(run["llm_family"], run["seed"]) for run in results["runs"]}
    assert len(runs) >= 3 and f"over {len(runs)} runs" in readme
    for line in verdict_lines(ROOT / "experiments" / "results" / "demo_seeds_full_cpu", results["targets"]):
        assert line in readme, line


def test_readme_quotes_the_projection_only_switch_benchmark():
    """The switch's section (`demo_seeds.py --freeze_iq_former --pretrain_steps 3000`) quotes that benchmark's
    table line for line, and its verdicts with their figures as the results file printed them."""
    readme = (ROOT / "README.md").read_text()
    stem = ROOT / "experiments" / "results" / "demo_seeds_full_frozen-iq-former_3000steps_cpu"
    results = json.loads(stem.with_suffix(".json").read_text())
    for line in results["readme_table"]:
        assert line in readme, line
    for line in verdict_lines(stem, results["targets"]):
        assert line in readme, line


def test_readme_table3_rows_are_the_tables_benchmark_lines():
    """The README's Table 3 rows and Fig. 7 table are lines of the benchmark's own tables (`demo_run.py --preset
    tables`), so they cannot drift from the file that holds the measurement."""
    readme = (ROOT / "README.md").read_text()
    benchmark = (ROOT / "experiments" / "results" / "demo_tables_cpu.md").read_text().splitlines()
    names = [demo.VIKDF, *(f"VIKDF {suffix}" for suffix in demo.PRETRAINING_ABLATIONS), demo.NO_PRETRAIN,
             "VIKDF, zero knowledge"]
    for name in names:
        (line,) = [line for line in benchmark if line.startswith(f"| {name} |")]
        assert line in readme, line
    figure7 = benchmark[benchmark.index("| n | knowledge acc. | BLEU-1 | ROUGE-L |"):][:7]  # header, rule, 5 rows
    assert [line.split(" | ")[0] for line in figure7[2:]] == ["| 4", "| 8", "| 16", "| 32", "| 64"]
    for line in figure7:
        assert line in readme, line



def test_stand_in_clip_tells_the_names_apart_but_not_their_usual_colours(tmp_path):
    """The world's invariant, measured on the stand-in CLIP the default demo trains (seed 5, not a README seed): its
    text tower puts contexts about one kind together (the untrained tower: 7 %), but neither its colour words nor its
    images tell an image-only kind's usual colour from the kind's name (chance 1/6). What keeps the colours out, the
    CLIP pairs' random colours, is checked on the data in `tests/test_synthetic.py`."""
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from configuration_vikdf import CAPTION_PROMPTS, RECONSTRUCTION_PROMPTS
    from vikdf.data.dialogue import load_dialogues
    from vikdf.demo.world import COLOURS, iter_shard_pairs, mentioned_object, write_synthetic_world
    from vikdf.testing import write_tiny_components

    full = demo.PRESETS["full"]
    world = write_synthetic_world(tmp_path / "world", seed=5, num_pairs=full["num_pairs"],
                                  num_heldout_pairs=full["num_heldout_pairs"], num_dialogues=120,
                                  num_eval_dialogues=full["num_eval_dialogues"])
    corpus = world.lm_corpus.read_text().splitlines() + list(CAPTION_PROMPTS) + list(RECONSTRUCTION_PROMPTS)
    clip_folder = write_tiny_components(tmp_path / "components", "llama", corpus=corpus, seed=5, vocab_size=1024).clip
    demo.prepare_clip(world, clip_folder, full, seed=5)
    clip, tokenizer = CLIPModel.from_pretrained(clip_folder).eval(), AutoTokenizer.from_pretrained(clip_folder)

    @torch.no_grad()
    def text_features(texts):
        features = clip.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))
        return torch.nn.functional.normalize(getattr(features, "pooler_output", features), dim=-1)

    dialogues = load_dialogues(world.reddit_valid) + load_dialogues(world.image_chat_test)
    kinds = [mentioned_object(list(d.context), world.object_names) for d in dialogues]
    similarity = (lambda f: f @ f.T)(text_features(["\n".join(d.context) for d in dialogues]))
    nearest = similarity.fill_diagonal_(-2).argmax(-1).tolist()
    assert sum(kinds[i] == kinds[j] for i, j in enumerate(nearest)) / len(kinds) >= 0.3  # chance 1/48

    image_only = [kind for kind in world.kinds if kind.image_only]
    names = text_features([f"a {kind.name}." for kind in image_only])
    by_word = (names @ text_features([f"a {colour} object." for colour in COLOURS]).T).argmax(-1).tolist()
    assert sum(list(COLOURS)[c] == kind.usual_colour for c, kind in zip(by_word, image_only)) / len(image_only) <= 1 / 3
    pairs = list(iter_shard_pairs([world.heldout_shard]))
    pixels = CLIPImageProcessor.from_pretrained(clip_folder)([image for _, image, _ in pairs], return_tensors="pt")
    with torch.no_grad():
        images = clip.get_image_features(pixel_values=pixels["pixel_values"])
    images = torch.nn.functional.normalize(getattr(images, "pooler_output", images), dim=-1)
    shown = [demo._shown_colour(image) for _, image, _ in pairs]
    nearest_images = (names @ images.T).topk(5, dim=-1).indices.tolist()
    usual = [sum(shown[j] == kind.usual_colour for j in row) / 5 for kind, row in zip(image_only, nearest_images)]
    assert sum(usual) / len(usual) <= 1 / 3


def test_real_llm_smoke_preset_runs_end_to_end_on_smollm2(tmp_path, capsys, demo_cache, smollm2):
    """`--preset real-llm` at its smoke size: the same stages and rows with the real SmolLM2-135M-Instruct frozen in
    place of the stand-in LLM, built into VIKDF by the component loader as a Hub LLM would be."""
    out = tmp_path / "demo"
    summary = demo.main(["--preset", "real-llm-smoke", "--output_dir", str(out), "--cache_dir", str(demo_cache)])
    printed = capsys.readouterr().out
    assert summary["llm_family"] == "SmolLM2-135M-Instruct" and list(summary["stand_ins"]) == ["clip"]
    assert [line for line in printed.splitlines() if "2/6 towers: stand-in CLIP" in line]
    assert sorted(p.name for p in (out / "components").iterdir()) == ["bert", "clip"]  # no stand-in LLM written
    config = json.loads((out / "vikdf" / "config.json").read_text())["text_config"]
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert list(summary["systems"]) == [demo.FROZEN_LLM, demo.NO_PRETRAIN, demo.VIKDF, demo.SHUFFLED]
    for name, metrics in summary["systems"].items():
        for key in ("ppl", "bleu_1", "rouge_l", "embedding_average", "vector_extrema", "greedy_matching",
                    "distinct_1", "distinct_2", "knowledge_accuracy", "knowledge_accuracy_seen"):
            assert math.isfinite(metrics[key]), (name, key)
    assert len(summary["examples"]) == 3 and all(example["frozen LLM"] for example in summary["examples"])


def test_real_llm_preset_refuses_a_stand_in_family(tmp_path):
    with pytest.raises(ValueError, match="--llm_family 'qwen2' picks the stand-in LLM"):
        demo.main(["--preset", "real-llm", "--llm_family", "qwen2", "--output_dir", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()


def test_readme_quotes_the_real_llm_run():
    """The README's real-LLM section quotes `demo_run.py --preset real-llm`'s rows, intervals and examples."""
    readme = (ROOT / "README.md").read_text()
    stem = ROOT / "experiments" / "results" / "demo_real-llm_cpu"
    systems = quoted_run(readme, stem.with_suffix(".json"))
    assert list(systems) == [demo.FROZEN_LLM, demo.NO_PRETRAIN, demo.VIKDF, demo.SHUFFLED]
    outcomes = {name: [None if o is None else tuple(o) for o in row["knowledge_outcomes"]]
                for name, row in systems.items()}
    for reference in (demo.FROZEN_LLM, demo.NO_PRETRAIN):  # the verdicts the demo printed, with their intervals
        line = demo.compare("The distilled knowledge" if reference == demo.FROZEN_LLM else "VIKDF pre-training",
                            demo.VIKDF, reference, outcomes)
        assert line in readme, line
    for example in json.loads(stem.with_suffix(".json").read_text())["summary"]["examples"][:2]:
        for key in ("response", "frozen LLM"):
            assert example[key] in readme, example[key]
