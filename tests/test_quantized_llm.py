"""The frozen LLM in 4-bit or 8-bit (bitsandbytes on this CPU): only the LLM is quantised, the rest trains as before,
gradients reach K through the quantised layers, the checkpoint records it, and bad combinations are refused early."""

import json
import math
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig

import eval_dialogue
import train_dialogue
import train_pretrain
from modeling_vikdf import NOT_QUANTISED, VIKDFForConditionalGeneration
from tests.conftest import run_outside_the_checkout
from tests.pretrain_helpers import pretrain_argv
from vikdf.evaluation.dialogues import load_checkpoint
from vikdf.training.quantization import LLMQuantizationArguments, check_quantization_request, checkpoint_quantization

bnb = pytest.importorskip("bitsandbytes")
QUANTISED_LINEAR = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}
CONTEXT = ["a dog in the park", "is it playing?"]
# Step-0 losses of a quantised LLM against the same model unquantised, same batch: relative tolerance of the
# objectives that go through the LLM (rounding a random tiny LLM's weights); the others never touch it.
LLM_LOSS_TOLERANCE = 0.05


def quantisation_flags(mode: str) -> list[str]:
    return [] if mode == "none" else ["--llm_quantization", mode]


@pytest.fixture(scope="module")
def runs(tiny_components, pair_world, tmp_path_factory):
    """Pre-training (3 steps, first-step losses logged) and dialogue fine-tuning (2 steps) per LLM precision."""
    root = tmp_path_factory.mktemp("quantised")
    components = tiny_components("llama")
    train_file = root / "train.json"
    train_file.write_text(json.dumps([{"context": CONTEXT, "response": "yes, with a red ball."}] * 4))
    results = {}
    for mode in ("none", "4bit", "8bit"):
        pretrained = root / f"pretrain-{mode}"
        argv = pretrain_argv(components, f"wds:{pair_world.train_shards}", pretrained, max_steps=3, logging_steps=1,
                             save_strategy="no", seed=0)
        pretrainer = train_pretrain.main(argv + quantisation_flags(mode))
        finetuned = train_dialogue.main([
            "--model_name_or_path", str(pretrained), "--train_file", str(train_file), "--output_dir", str(root / f"dialogue-{mode}"),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--activation_checkpointing", "true",
            "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0",
        ])
        results[mode] = {"pretrained": pretrained, "pretrainer": pretrainer, "finetuned": finetuned,
                         "card": (root / f"dialogue-{mode}" / "README.md").read_text()}
    return results


def _llm_linears(model):
    return [module for name, module in model.language_model.named_modules() if name.startswith("model.layers.")
            and isinstance(module, nn.Linear)]


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_only_the_llm_layers_are_quantised_and_the_checkpoint_says_so(runs, mode):
    model = runs[mode]["pretrainer"].model
    assert all(isinstance(layer, QUANTISED_LINEAR[mode]) for layer in _llm_linears(model))
    assert _llm_linears(model), "the LLM has no linear layers to check"
    for part in ("iq_former", "language_projection", "text_encoder", "iakr_head", "tamim_block"):
        assert not any(type(m).__module__.startswith("bitsandbytes") for m in getattr(model, part).modules()), part
    assert type(model.language_model.lm_head) is nn.Linear
    assert checkpoint_quantization(model.config) == mode
    saved = json.loads((runs[mode]["pretrained"] / "config.json").read_text())
    assert checkpoint_quantization(type(model.config).from_dict(saved)) == mode
    assert set(NOT_QUANTISED) <= set(saved["quantization_config"]["llm_int8_skip_modules"])
    # The fine-tuning loaded the pre-training output with its LLM quantised, with no flag given.
    assert all(isinstance(layer, QUANTISED_LINEAR[mode]) for layer in _llm_linears(runs[mode]["finetuned"].model))
    # Its model card says so, and what loading it needs.
    assert f"stored in {mode.replace('bit', '-bit')} (bitsandbytes)" in runs[mode]["card"]
    assert "pip install bitsandbytes" in runs[mode]["card"] and "bitsandbytes" not in runs["none"]["card"]


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_step_zero_losses_stay_close_to_the_unquantised_model(runs, mode):
    def first_losses(run):
        return next(entry for entry in run["pretrainer"].state.log_history if "loss_iaci" in entry)

    full, quantised = first_losses(runs["none"]), first_losses(runs[mode])
    for name in ("loss_tim", "loss_tamim", "loss_iamtm"):  # no LLM in these: the same batch gives the same value
        assert quantised[name] == pytest.approx(full[name], rel=1e-5), name
    for name in ("loss_iaci", "loss_iakr", "loss"):
        assert math.isfinite(quantised[name])
        assert quantised[name] == pytest.approx(full[name], rel=LLM_LOSS_TOLERANCE), (name, full[name], quantised[name])


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_training_moves_the_trainable_parts_and_leaves_the_llm(runs, build_tiny, mode):
    """Dialogue fine-tuning's only loss is the LLM's response NLL: the queries and the IQ-Former change only if its
    gradient came back through the quantised layers (with the LLM's activations checkpointed)."""
    start = build_tiny()[0].state_dict()
    pretrained = runs[mode]["pretrainer"].model
    finetuned = runs[mode]["finetuned"].model
    for name in ("query_tokens", "iq_former.encoder.layer.0.crossattention.attention.query.weight",
                 "language_projection.weight", "iakr_head.weight"):
        assert not torch.equal(pretrained.state_dict()[name], start[name]), name
    pretrained_state = pretrained.state_dict()
    for name in ("query_tokens", "language_projection.weight", "iq_former.encoder.layer.0.attention.attention.query.weight"):
        assert not torch.equal(finetuned.state_dict()[name], pretrained_state[name]), name
    llm_before = {k: v for k, v in pretrained_state.items() if k.startswith("language_model.")}
    llm_after = {k: v for k, v in finetuned.state_dict().items() if k.startswith("language_model.")}
    assert llm_before.keys() == llm_after.keys()
    assert all(torch.equal(llm_before[k], llm_after[k]) for k in llm_before)
    assert not any(p.requires_grad for p in finetuned.language_model.parameters())


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_saved_quantised_checkpoint_generates_the_same_in_a_fresh_process(runs, tmp_path, mode):
    folder = runs[mode]["finetuned"].output_dir
    model, processor = load_checkpoint(folder)
    assert all(isinstance(layer, QUANTISED_LINEAR[mode]) for layer in _llm_linears(model))
    inputs = processor(text=[CONTEXT])
    expected = processor.decode_responses(model.generate(**inputs, max_new_tokens=6), inputs["input_ids"].shape[1])
    script = textwrap.dedent(
        f"""
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model.language_model.model.layers[0].mlp.up_proj).__name__ == {QUANTISED_LINEAR[mode].__name__!r}
        inputs = processor(text=[{CONTEXT!r}])
        out = processor.decode_responses(model.generate(**inputs, max_new_tokens=6), inputs["input_ids"].shape[1])
        assert out == {expected!r}, out
        print("SAME RESPONSES")
        """
    )
    result = run_outside_the_checkout(script, tmp_path)
    assert "SAME RESPONSES" in result.stdout, result.stderr[-3000:]


def test_a_users_quantization_config_quantises_the_llm_alone(save_tiny_vikdf, tmp_path):
    folder = save_tiny_vikdf(tmp_path / "full")
    user = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["o_proj"])
    model = VIKDFForConditionalGeneration.from_pretrained(folder, quantization_config=user)
    layer = model.language_model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, bnb.nn.Linear4bit)
    assert type(layer.self_attn.o_proj) is nn.Linear  # the user's own skip list is kept
    assert type(model.iq_former.encoder.layer[0].attention.attention.query) is nn.Linear
    assert type(model.language_projection) is nn.Linear and type(model.text_projection) is nn.Linear
    with pytest.raises(ValueError, match="bitsandbytes only"):
        from transformers import GPTQConfig

        VIKDFForConditionalGeneration.from_pretrained(folder, quantization_config=GPTQConfig(bits=4))


def test_eval_of_an_unquantised_checkpoint_with_a_4bit_llm(runs, tmp_path):
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps([{"context": CONTEXT, "response": "yes."}] * 2))
    metrics = eval_dialogue.main([
        "--model_name_or_path", runs["none"]["finetuned"].output_dir, "--test_file", str(test_file),
        "--output_dir", str(tmp_path / "eval"), "--max_new_tokens", "4", "--llm_quantization", "4bit",
        "--update_model_card", "false", "--disable_tqdm", "true",
    ])
    assert math.isfinite(metrics["ppl"])


def test_bad_combinations_are_refused_before_any_load(runs, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--llm_quant_type fp4 goes with --llm_quantization 4bit"):
        LLMQuantizationArguments(llm_quantization="8bit", llm_quant_type="fp4")
    with pytest.raises(ValueError, match="ZeRO-3"):
        check_quantization_request(LLMQuantizationArguments(llm_quantization="4bit"), None, "llm", deepspeed_zero3=True)

    # Anything that loads a model fails this test: the refusals below come first.
    monkeypatch.setattr(VIKDFForConditionalGeneration, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps([{"context": CONTEXT, "response": "yes."}]))
    dialogue = ["--train_file", str(train_file), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", "--report_to", "none"]
    with pytest.raises(ValueError, match="holds its LLM in 4bit; --llm_quantization 8bit cannot change that"):
        train_dialogue.main(["--model_name_or_path", str(runs["4bit"]["pretrained"]), "--llm_quantization", "8bit", *dialogue])
    with pytest.raises(ValueError, match="--method lora merges its adapters"):
        train_dialogue.main(["--model_name_or_path", str(runs["4bit"]["pretrained"]), "--method", "lora", *dialogue])
    with pytest.raises(ValueError, match="--method lora merges its adapters"):
        train_dialogue.main(["--model_name_or_path", str(runs["none"]["pretrained"]), "--method", "lora",
                             "--llm_quantization", "4bit", *dialogue])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[quantization\]'"):
        train_dialogue.main(["--model_name_or_path", str(runs["4bit"]["pretrained"]), *dialogue])


def test_the_pipeline_loads_an_unquantised_checkpoint_with_a_4bit_llm(runs, tmp_path):
    folder = runs["none"]["finetuned"].output_dir
    model, processor = load_checkpoint(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    inputs = processor(text=[CONTEXT])
    expected = processor.decode_responses(model.generate(**inputs, max_new_tokens=6), inputs["input_ids"].shape[1])[0]
    script = textwrap.dedent(
        f"""
        from transformers import BitsAndBytesConfig, pipeline
        chat = pipeline("text-generation", model={str(folder)!r}, trust_remote_code=True,
                        model_kwargs={{"quantization_config": BitsAndBytesConfig(load_in_4bit=True)}})
        assert type(chat.model.language_model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        assert type(chat.model.language_projection).__name__ == "Linear"
        out = chat({CONTEXT!r}, max_new_tokens=6)
        assert out == {{"generated_text": {expected!r}}}, out
        print("PIPELINE 4BIT OK")
        """
    )
    result = run_outside_the_checkout(script, tmp_path)
    assert "PIPELINE 4BIT OK" in result.stdout, result.stderr[-3000:]
