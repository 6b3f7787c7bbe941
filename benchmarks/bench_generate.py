"""Dialogue responses per second of zero-resource VIKDF inference (paper §3.4.2) with the evaluation settings of the
released code: beam search 3, `no_repeat_ngram_size=3`, 32 new tokens, no sampling; at batch 1 (the released
code's setting) and batched (left padding, contexts of similar length together).

    python benchmarks/bench_generate.py                                      # tiny, this machine
    python benchmarks/bench_generate.py --size paper --batch_sizes 1 8 16 32 64

tiny: tiny CLIP / BERT / Llama component folders are written to a temporary folder
(`vikdf.testing.write_tiny_components`) and built into a VIKDF with its `VIKDFProcessor` through
`vikdf.training.components.build_vikdf_from_components`, exactly as from hub ids; the timed call is
`vikdf.evaluation.dialogues.generate_responses` (what `eval_dialogue.py` runs: processor -> context through the CLIP text
tower and IQ-Former -> knowledge -> LLM beam search -> decoded responses) on synthetic 2-3 turn dialogues.
paper: `VIKDFConfig()` shapes without the pre-training heads (an inference checkpoint), random weights, and
synthetic token ids of the same layout the processor writes (Llama-2 chat prompt with 32 knowledge slots, contexts
of `--context_tokens/2 .. --context_tokens` tokens, left padded; CLIP context up to 77 tokens); no tokenizer.

Every response is forced to exactly `--max_new_tokens` new tokens (`min_new_tokens` = `max_new_tokens`) unless
`--allow_early_stop` is given, so that batch sizes do the same work whatever a random model's end-of-sequence
behaviour is; a trained model stops some beams early, which favours batch 1 a little. "responses/s" = dialogues /
wall time of the generation of all of them (inputs built before the timer at paper size; inside it at tiny size,
as `generate_responses` builds them). With `--rounds R`, every batch size runs R times interleaved and the median
is reported. Rows "previous code" time `model.generate` as it was before it matched the release (the prompt's ids passed to the
LLM with its embeddings, so that the n-gram blocking walked the whole prompt at every step), interleaved with the
current code's, in the same run.
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

from configuration_vikdf import LLAMA_2_7B, VIKDFConfig  # noqa: E402
from modeling_vikdf import VIKDFForConditionalGeneration  # noqa: E402

# vikdf.testing / tests/conftest.py: the tiny overrides the test-suite builds with.
TINY_OVERRIDES = dict(
    num_query_tokens=8, mask_patch_size=8, head_num_attention_heads=4, head_intermediate_size=64, tim_embed_dim=16
)


# ---------------------------------------------------------------------------------------------------------------- tiny


CURRENT, PREVIOUS = "current", "previous"


def synthetic_dialogues(count: int, seed: int) -> list[list[str]]:
    """2-3 turn contexts built from the tiny tokenizers' corpus (so that the BPE covers them)."""
    from vikdf.testing import DEFAULT_CORPUS

    rng = random.Random(seed)
    return [[rng.choice(DEFAULT_CORPUS) for _ in range(rng.choice((2, 3)))] for _ in range(count)]


class TinyPipeline:
    def __init__(self, args, device, dtype):
        from vikdf.training.components import build_vikdf_from_components
        from vikdf.testing import write_tiny_components

        self._tmp = tempfile.TemporaryDirectory(prefix="vikdf-bench-")
        torch.manual_seed(args.seed)
        paths = write_tiny_components(self._tmp.name, args.llm_family)
        model, processor = build_vikdf_from_components(
            str(paths.clip), str(paths.bert), str(paths.llm), dtype=dtype, **TINY_OVERRIDES
        )
        self.model = model.to(device).eval()
        self.processor = processor
        self.contexts = synthetic_dialogues(args.num_dialogues, args.seed)
        self.device = device

    def prepare(self, batch_size: int, limit: int | None = None) -> list:
        """The contexts as they are: the evaluation code tokenises inside the timed call, as `eval_dialogue.py` does."""
        return self.contexts[:limit]

    def generate(self, prepared: list, batch_size: int, settings: dict) -> list[str]:
        """The dialogues through the evaluation code; the responses in input order."""
        from vikdf.evaluation.dialogues import generate_responses

        return generate_responses(self.model, self.processor, prepared, batch_size=batch_size, progress=False, **settings)

    @property
    def pad_eos(self) -> tuple[int, int]:
        tokenizer = self.processor.tokenizer
        return tokenizer.pad_token_id, tokenizer.eos_token_id

    def close(self):
        self._tmp.cleanup()


# ---------------------------------------------------------------------------------------------------------------- paper


class PaperPipeline:
    """Random-weight VIKDF of the paper's shapes and synthetic processor-layout ids."""

    def __init__(self, args, device, dtype):
        text = {**LLAMA_2_7B, "vocab_size": 32001, "pad_token_id": 0}
        if args.llm_layers:
            text["num_hidden_layers"] = args.llm_layers
        config = VIKDFConfig(text_config=text, knowledge_token_id=32000, include_pretraining_heads=False)
        torch.manual_seed(args.seed)
        self.model = common.build_random_model(VIKDFForConditionalGeneration, copy.deepcopy(config), device, dtype,
                                               args.attn_implementation).eval()
        self.config = self.model.config
        self.device = device
        self.examples = self._examples(args)

    def _examples(self, args) -> list[dict]:
        g = torch.Generator().manual_seed(args.seed)
        clip = self.config.clip_config.text_config
        n, k = self.config.num_query_tokens, self.config.knowledge_token_id
        examples = []
        for _ in range(args.num_dialogues):
            length = int(torch.randint(args.context_tokens // 2, args.context_tokens + 1, (1,), generator=g))
            context = torch.randint(3, k, (length,), generator=g).tolist()
            inst, end = torch.randint(3, k, (4,), generator=g).tolist(), torch.randint(3, k, (4,), generator=g).tolist()
            ids = [1, *inst, *([k] * n), *context, *end]  # [bos] [INST] <k>xn context [/INST]
            clip_body = torch.randint(0, clip.bos_token_id, (min(length, self.config.clip_max_length - 2),),
                                      generator=g).tolist()
            examples.append({"ids": ids, "clip": [clip.bos_token_id, *clip_body, clip.eos_token_id]})
        return examples

    def _batch(self, chunk: list[dict]) -> dict:
        width = max(len(e["ids"]) for e in chunk)
        clip_width = max(len(e["clip"]) for e in chunk)
        eos = self.config.clip_config.text_config.eos_token_id
        ids = torch.tensor([[0] * (width - len(e["ids"])) + e["ids"] for e in chunk])
        mask = torch.tensor([[0] * (width - len(e["ids"])) + [1] * len(e["ids"]) for e in chunk])
        clip = torch.tensor([e["clip"] + [eos] * (clip_width - len(e["clip"])) for e in chunk])
        clip_mask = torch.tensor([[1] * len(e["clip"]) + [0] * (clip_width - len(e["clip"])) for e in chunk])
        return {"input_ids": ids, "attention_mask": mask, "clip_input_ids": clip, "clip_attention_mask": clip_mask}

    def prepare(self, batch_size: int, limit: int | None = None) -> list[tuple[list[int], dict]]:
        """Longest contexts first in batches of similar length (as `vikdf.evaluation.dialogues`), already on the device."""
        examples = self.examples[:limit]
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["ids"]))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        return [(chunk, {k: v.to(self.device) for k, v in self._batch([examples[i] for i in chunk]).items()})
                for chunk in batches]

    def generate(self, prepared: list[tuple[list[int], dict]], batch_size: int, settings: dict) -> list[list[int]]:
        """New ids per dialogue, in input order."""
        outputs: list[list[int] | None] = [None] * sum(len(chunk) for chunk, _ in prepared)
        with torch.no_grad():
            for chunk, batch in prepared:
                generated = self.model.generate(**batch, **settings)
                new = generated[:, batch["input_ids"].shape[1] :].tolist()
                for index, row in zip(chunk, new):
                    outputs[index] = [t for t in row if t != settings["pad_token_id"]]
        return outputs

    @property
    def pad_eos(self) -> tuple[int, int]:
        return 0, 2

    def close(self):
        self.model = None


# ---------------------------------------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def prompt_ids_to_the_llm(model):
    """`model.generate` as before it matched the release: the prompt's ids went to the LLM with its embeddings, so
    every logits processor (the n-gram blocking included) walked them at every step and blocked the context's
    n-grams. Outputs may differ from the current code's for that reason."""

    def previous_generate(input_ids, attention_mask=None, clip_input_ids=None, clip_attention_mask=None,
                          knowledge=None, **generate_kwargs):
        if knowledge is None and clip_input_ids is not None:
            knowledge = model.get_text_knowledge(clip_input_ids, clip_attention_mask)
        generate_kwargs.setdefault("generation_config", model.generation_config)
        return model.language_model.generate(
            input_ids=input_ids, inputs_embeds=model.embed_with_knowledge(input_ids, knowledge),
            attention_mask=torch.ones_like(input_ids) if attention_mask is None else attention_mask, **generate_kwargs,
        )

    model.generate = previous_generate
    try:
        yield
    finally:
        del model.generate


def timed_run(pipeline, batch_size: int, settings: dict, previous_code: bool, outputs: dict):
    """A measurement: generating every dialogue at `batch_size` from inputs the pipeline prepared; the outputs of
    the current code kept by batch size."""
    def run():
        prepared = pipeline.prepare(batch_size)
        variant = prompt_ids_to_the_llm(pipeline.model) if previous_code else contextlib.nullcontext()
        with variant, common.PeakMemory(pipeline.device) as memory:
            common.synchronize(pipeline.device)
            start = time.perf_counter()
            generated = pipeline.generate(prepared, batch_size, settings)
            common.synchronize(pipeline.device)
            seconds = time.perf_counter() - start
        if not previous_code:
            outputs[batch_size] = generated
        return {"seconds": [seconds], "peak_gib": [memory.peak_gib]}
    return run


def parse_args(argv=None):
    p = common.argument_parser(__doc__)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--num_dialogues", type=int, default=64)
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--no_repeat_ngram_size", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--allow_early_stop", action="store_true", help="do not force max_new_tokens new tokens")
    p.add_argument("--context_tokens", type=int, default=64, help="paper size: longest synthetic context")
    p.add_argument("--no_previous_code", action="store_true", help="skip the rows of the previous generate")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = common.setup(args)
    rounds = args.rounds or 2
    label = args.size + (f"-{args.llm_family}" if args.llm_family != "llama" else "")
    label += f"-llm{args.llm_layers}L" if args.llm_layers else ""
    pipeline = (TinyPipeline if args.size == "tiny" else PaperPipeline)(args, device, dtype)
    pad, eos = pipeline.pad_eos
    settings = {"num_beams": args.num_beams, "no_repeat_ngram_size": args.no_repeat_ngram_size,
                "max_new_tokens": args.max_new_tokens, "do_sample": False, "pad_token_id": pad, "eos_token_id": eos}
    if not args.allow_early_stop:
        settings["min_new_tokens"] = args.max_new_tokens
    sizes = sorted(set(args.batch_sizes))
    configs = [(size, CURRENT) for size in sizes]
    configs += [] if args.no_previous_code else [(size, PREVIOUS) for size in sorted({sizes[0], sizes[-1]})]
    for size in sizes:  # warm-up: kernels, allocator, tokenizers
        common.guarded(lambda: pipeline.generate(pipeline.prepare(size, limit=size), size, settings), device)

    outputs, n, rows = {}, args.num_dialogues, []
    measured = common.interleaved([timed_run(pipeline, size, settings, variant == PREVIOUS, outputs)
                                   for size, variant in configs], rounds, device)
    for (size, variant), runs in zip(configs, measured):
        seconds = common.median_of(runs, "seconds")
        rows.append({"batch_size": size, "variant": variant, **(seconds if isinstance(seconds, dict) else {
            "seconds": seconds, "responses_per_s": n / seconds, "new_tokens_per_s": n * args.max_new_tokens / seconds,
            "peak_memory_gib": max(r["peak_gib"][0] for r in runs)})})
    base = {r["variant"]: r for r in rows if r["batch_size"] == sizes[0] and "error" not in r}
    current = {r["batch_size"]: r for r in rows if r["variant"] == CURRENT and "error" not in r}
    for r in (r for r in rows if "error" not in r):
        r["speedup_vs_batch1"] = r["responses_per_s"] / base[r["variant"]]["responses_per_s"] if r["variant"] in base else None
        r["vs_current_code"] = r["responses_per_s"] / current[r["batch_size"]]["responses_per_s"] if r["batch_size"] in current else None
        if r["variant"] == CURRENT and sizes[0] in outputs:
            r["identical_to_batch1"] = f"{sum(a == b for a, b in zip(outputs[r['batch_size']], outputs[sizes[0]]))}/{n}"

    table = [[f"{r['batch_size']}" + (" (previous code)" if r["variant"] == PREVIOUS else ""), r["error"]]
             if "error" in r else
             [f"{r['batch_size']}" + (" (previous code)" if r["variant"] == PREVIOUS else ""),
              common.fmt(r["responses_per_s"]), common.fmt(r["new_tokens_per_s"], 0), common.fmt(r["seconds"]),
              f"{common.fmt(r['speedup_vs_batch1'])}x", f"{common.fmt(r['vs_current_code'])}x",
              common.fmt(r["peak_memory_gib"]), r.get("identical_to_batch1", "")] for r in rows]
    lines = [f"- dtype {common.dtype_name(dtype)}, beam {args.num_beams}, no_repeat_ngram_size "
             f"{args.no_repeat_ngram_size}, {'up to' if args.allow_early_stop else 'exactly'} {args.max_new_tokens} new "
             f"tokens; {n} dialogues per row, median of {rounds} interleaved round(s); timed: "
             + ("`vikdf.evaluation.dialogues.generate_responses`" if args.size == "tiny" else "`model.generate` on built inputs"),
             "", common.markdown_table(["batch size", "responses/s", "new tokens/s", f"seconds for {n}",
                                        "vs batch 1 (same code)", "vs the current code", "peak GiB",
                                        "same output as batch 1"], table)]
    pipeline.close()
    common.publish(f"generate_{common.device_slug(device)}_{label}" + (f"_{args.tag}" if args.tag else ""),
                   f"VIKDF dialogue generation, size {label}" + (" (CPU)" if device.type == "cpu" else ""), lines,
                   {"args": vars(args), "settings": settings, "rows": rows}, args.output_dir, device)


if __name__ == "__main__":
    main()
