"""The main job at a smaller setting: every stage runs, writes its outputs, and reports finite numbers."""

import json
import math

import demo


def test_demo_smoke_preset_runs_end_to_end(tmp_path, capsys):
    summary = demo.main(["--preset", "smoke", "--output_dir", str(tmp_path / "demo")])
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert "| System | PPL | BLEU-1 | ROUGE-L |" in printed and printed.count("| VIKDF") == 2  # VIKDF and its ablation
    assert "TIM text→image recall@1 on 100 held-out pairs" in printed
    assert [line for line in printed.splitlines() if line.startswith("[")][-1].endswith("6/6 report")
    assert list(summary["stage_seconds"]) == ["world", "stand_in_towers", "pretrain", "dialogue_fine_tuning",
                                              "evaluation", "report"]
    assert (out / "loss_curves.png").stat().st_size > 0
    for split in ("eval", "eval_seen"):
        for system in ("llm", "lora", "no_pretrain", "vikdf"):
            assert (out / split / system / "predictions.jsonl").exists() and (out / split / system / "metrics.md").exists()
    assert len((out / "eval" / "vikdf" / "knowledge.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert len(summary["systems"]) == 4
    for name, metrics in summary["systems"].items():
        for key in ("ppl", "bleu_1", "rouge_l", "distinct_1", "distinct_2", "knowledge_accuracy", "knowledge_accuracy_seen"):
            assert math.isfinite(metrics[key]), (name, key)
        assert metrics["embedding_average"] is None  # no GloVe file: reported as missing, never as 0
    assert all(0.0 <= rate <= 1.0 for rate in summary["llm_prompt_use"].values())
    assert summary["tim_recall_at_1"] >= 5 * summary["tim_chance"]


def test_verdict_counts_a_gain_only_beyond_sampling_noise():
    accuracy = {"a": 0.80, "b": 0.15, "c": 0.75}
    assert demo.compare("X", "a", "b", accuracy, count=120).startswith("X helped")
    assert "did NOT measurably help" in demo.compare("X", "a", "c", accuracy, count=120)
