"""Responses per second of `eval_dialogue.py`'s `generate_responses` with the model's `generation_config` (beam 3,
`no_repeat_ngram_size` 3, 32 new tokens, forced to the full length), at batch 1, batched, and by the previous code."""

from __future__ import annotations

import contextlib
import random
from unittest import mock

import _bench_common as common  # puts the repository root on sys.path
import torch

from modeling_vikdf import PAPER_GENERATION, VIKDFForConditionalGeneration
from vikdf.evaluation.dialogues import generate_responses
from vikdf.testing import DEFAULT_CORPUS

CURRENT, PREVIOUS, DIALOGUES = "current", "previous", 64


def model_and_processor(args, device: torch.device, dtype: torch.dtype):
    """tiny: a VIKDF built from `vikdf.testing`'s component folders, as from hub ids; paper: a random-weight inference
    VIKDF of the paper's shapes. Both with the tiny components' processor (its token ids fit every vocabulary)."""
    with common.tiny_workspace() as (_, components, _):
        model, processor = common.tiny_vikdf(components, dtype=dtype, num_query_tokens=8 if args.size == "tiny" else 32)
    if args.size == "paper":
        config = common.model_config("paper", args.llm_layers, include_pretraining_heads=False,
                                     knowledge_token_id=processor.knowledge_token_id)
        model = common.build_random_model(VIKDFForConditionalGeneration, config, device, dtype)
    return model.to(device).eval(), processor


def prompt_ids_to_the_llm(model):
    """`model.generate` as before it matched the release: the prompt's ids went to the LLM with its embeddings, so
    every logits processor (the n-gram blocking too) walked them at every step and blocked the context's n-grams."""

    def previous_generate(input_ids, attention_mask, clip_input_ids, clip_attention_mask, **generate_kwargs):
        knowledge = model.get_text_knowledge(clip_input_ids, clip_attention_mask)
        return model.language_model.generate(
            input_ids=input_ids, inputs_embeds=model.embed_with_knowledge(input_ids, knowledge),
            attention_mask=attention_mask, generation_config=model.generation_config, **generate_kwargs)

    return mock.patch.object(model, "generate", previous_generate)


def timed_run(model, processor, contexts: list, batch_size: int, settings: dict, previous: bool, outputs: dict):
    """A measurement: every dialogue at `batch_size`, tokenised and decoded (which waits for the device) included."""
    def run():
        variant = prompt_ids_to_the_llm(model) if previous else contextlib.nullcontext()
        with variant, common.PeakMemory(model.device) as memory:
            responses, seconds = common.timed(generate_responses, model, processor, contexts, batch_size=batch_size,
                                              progress=False, **settings)
        if not previous:
            outputs[batch_size] = responses
        return {"seconds": [seconds], "peak_gib": [memory.peak_gib]}
    return run


def main(argv=None):
    parser = common.argument_parser(__doc__)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    args = parser.parse_args(argv)
    device, dtype = common.setup(args)
    rounds = args.rounds or 2
    model, processor = model_and_processor(args, device, dtype)
    rng = random.Random(0)  # 2-3 turn contexts from the corpus the tiny tokenizers were trained on
    contexts = [[rng.choice(DEFAULT_CORPUS) for _ in range(rng.choice((2, 3)))] for _ in range(DIALOGUES)]
    decoding = {key: getattr(model.generation_config, key) for key in PAPER_GENERATION}
    # Every batch size does the same work whatever a random model's end-of-sequence behaviour is.
    settings = {"min_new_tokens": decoding["max_new_tokens"]}
    sizes = sorted(set(args.batch_sizes))
    configs = [(size, CURRENT) for size in sizes] + [(size, PREVIOUS) for size in sorted({sizes[0], sizes[-1]})]
    for size in sizes:  # warm-up: kernels, allocator, tokenizers
        common.guarded(timed_run(model, processor, contexts[:size], size, settings, False, {}), device)

    outputs = {}
    measured = common.interleaved([timed_run(model, processor, contexts, size, settings, variant == PREVIOUS, outputs)
                                   for size, variant in configs], rounds, device)
    rows = [{"batch_size": size, "variant": variant, **common.medians(runs, "seconds")}
            for (size, variant), runs in zip(configs, measured)]
    speed = {(r["batch_size"], r["variant"]): DIALOGUES / r["seconds"] for r in rows if "error" not in r}
    for r in (r for r in rows if "error" not in r):  # against batch 1 of the same code, the current code's batch
        own = speed[r["batch_size"], r["variant"]]
        batch1, current = speed.get((sizes[0], r["variant"])), speed.get((r["batch_size"], CURRENT))
        r.update(responses_per_s=own, new_tokens_per_s=own * decoding["max_new_tokens"],
                 speedup_vs_batch1=own / batch1 if batch1 else None, vs_current_code=own / current if current else None)
        if r["variant"] == CURRENT and sizes[0] in outputs:
            same = sum(a == b for a, b in zip(outputs[r["batch_size"]], outputs[sizes[0]]))
            r["identical_to_batch1"] = f"{same}/{DIALOGUES}"

    name = lambda r: f"{r['batch_size']}" + (" (previous code)" if r["variant"] == PREVIOUS else "")  # noqa: E731
    table = [[name(r), r["error"]] if "error" in r else
             [name(r), common.fmt(r["responses_per_s"]), common.fmt(r["new_tokens_per_s"], 0), common.fmt(r["seconds"]),
              f"{common.fmt(r['speedup_vs_batch1'])}x", f"{common.fmt(r['vs_current_code'])}x",
              common.fmt(r["peak_gib"]), r.get("identical_to_batch1", "")] for r in rows]
    stem, label = common.result_stem("generate", args, device)
    common.publish(stem, f"VIKDF dialogue generation, size {label}" + (" (CPU)" if device.type == "cpu" else ""), [
        f"- {dtype}, beam {decoding['num_beams']}, no_repeat_ngram_size {decoding['no_repeat_ngram_size']}, exactly "
        f"{decoding['max_new_tokens']} new tokens; {DIALOGUES} dialogues per row, median of {rounds} round(s)", "",
        common.markdown_table(["batch size", "responses/s", "new tokens/s", f"seconds for {DIALOGUES}",
                               "vs batch 1 (same code)", "vs the current code", "peak GiB", "same output as batch 1"],
                              table)], {"args": vars(args), "settings": {**decoding, **settings}, "rows": rows},
        args.output_dir, device)


if __name__ == "__main__":
    main()
