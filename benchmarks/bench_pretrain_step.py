"""Time the pre-training step `VIKDFPretrainTrainer` runs per micro-batch (FLOPs from `FlopCounterMode`, MFU, peak
memory), BLIP-2's LM step beside it, the ablations a-h and the paper schedule's projected wall time."""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager

import _bench_common as common  # puts the repository root on sys.path
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Blip2Config, Blip2ForConditionalGeneration, PreTrainedModel, Trainer

from modeling_vikdf import PretrainingPasses, VIKDFForConditionalGeneration
from vikdf.training.arguments import PretrainTrainingArguments
from vikdf.training.losses import IGNORE_INDEX
from vikdf.training.masking import mask_caption_tokens, tamim_pixel_masks
from vikdf.training.trainers import VIKDFPretrainTrainer

PAPER_STEPS, PAPER_GLOBAL_BATCH = 100_000, 128
OPTIM = "adamw_torch_fused"  # `PretrainTrainingArguments`' default, in the main rows
# letter: (what, settings), the first setting the "before"; each setting is `Bench.measure`'s keywords.
ABLATIONS = {
    "a": ("frozen vision tower, clean + masked images", {
        "two passes": {"passes": PretrainingPasses(one_vision_pass=False)}, "one batched pass": {}}),
    "b": ("IACI + IAKR rows through the LLM", {
        "two LLM calls": {"passes": PretrainingPasses(one_llm_pass=False)}, "one LLM call": {}}),
    "c": ("gradient checkpointing (memory vs time)", {
        "off": {}, "LLM only (the Trainer's flag)": {"checkpointing": "llm"},
        "every layer (generic)": {"checkpointing": "all"}}),
    "d": ("AdamW", {"adamw_torch": {"optim": "adamw_torch"}, "adamw_torch_fused": {"optim": "adamw_torch_fused"}}),
    "e": ("IQ-Former", {"eager": {}, "torch.compile": {"compiled": True}}),
    "f": ("clean-image CLIP states", {"vision forward": {}, "cached in host memory": {"cached": True}}),
    "g": ("LM-head logits", {"every position of every row": {"passes": PretrainingPasses(caption_logits_only=False)},
                             "IACI caption positions (the trainer)": {}}),
    "h": ("IAMTM vocabulary logits", {
        "every caption token": {"passes": PretrainingPasses(masked_token_logits_only=False)},
        "masked tokens only (the trainer)": {}}),
}


def blip2_config(vikdf) -> Blip2Config:
    """BLIP-2 with VIKDF's vision tower, its IQ-Former shape as the Q-Former and the same LLM."""
    vision = vikdf.clip_config.vision_config
    qformer = {k: v for k, v in vikdf.qformer_config.to_dict().items()
               if k not in ("encoder_hidden_size", "model_type", "transformers_version", "architectures", "dtype")}
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    return Blip2Config(vision_config={k: getattr(vision, k) for k in keys}, qformer_config=qformer,
                       text_config=vikdf.text_config.to_dict(), num_query_tokens=vikdf.num_query_tokens,
                       image_token_index=vikdf.knowledge_token_id)


def random_ids(g: torch.Generator, shape, low: int, high: int, exclude=()) -> torch.Tensor:
    """Uniform ids in [low, high), the special ids in `exclude` replaced by the smallest other one."""
    ids = torch.randint(low, high, shape, generator=g)
    ids[torch.isin(ids, torch.tensor(exclude))] = next(i for i in range(low, high) if i not in exclude)
    return ids


def vikdf_batch(config, batch: int, caption: int, prompt: int) -> dict:
    """One micro-batch of `PretrainCollator`'s keys, on the CPU as the collator leaves it: IACI rows
    `[bos] <k>xn prompt caption [eos]`, then IAKR rows `[bos] prompt caption <k>xn` padded to their width."""
    g, vision, text = torch.Generator().manual_seed(0), config.clip_config.vision_config, config.clip_config.text_config
    masks = tamim_pixel_masks(vision.image_size, vision.image_size, batch_size=batch, patch_size=config.mask_patch_size,
                              subpatch_size=vision.patch_size, mask_ratio=config.mask_ratio,
                              keep_ratio=config.mask_keep_ratio, generator=g)
    special, ones = (text.bos_token_id, text.eos_token_id, text.pad_token_id), torch.ones(batch, 1, dtype=torch.long)
    clip_ids = torch.cat([ones * text.bos_token_id, random_ids(g, (batch, caption), 0, text.vocab_size, special),
                          ones * text.eos_token_id], 1)
    masked_ids, mlm_labels = mask_caption_tokens(
        clip_ids, text.eos_token_id, attention_mask=torch.ones_like(clip_ids), special_token_ids=set(special),
        mask_ratio=config.text_mask_ratio, keep_ratio=config.text_mask_keep_ratio, generator=g)
    n, k = config.num_query_tokens, config.knowledge_token_id
    words, slots = random_ids(g, (batch, prompt + caption), 3, k), torch.full((batch, n), k)
    rows = [torch.cat([ones, slots, words, ones * 2], 1)]  # ids 1, 2, 0: the LLM's bos, eos and padding
    labels = [torch.cat([torch.full((batch, 1 + n + prompt), IGNORE_INDEX), words[:, prompt:], ones * 2], 1)]
    if config.use_bvif:
        rows.append(torch.cat([ones, words, slots, ones * 0], 1))
        labels.append(torch.full_like(rows[1], IGNORE_INDEX))
    llm_ids = torch.cat(rows)
    return {"pixel_values": torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g),
            "pixel_mask": masks.scored, "pixel_replaced_mask": masks.replaced, "clip_input_ids": clip_ids,
            "clip_attention_mask": torch.ones_like(clip_ids), "clip_masked_input_ids": masked_ids,
            "clip_mlm_labels": mlm_labels, "llm_input_ids": llm_ids, "llm_attention_mask": (llm_ids != 0).long(),
            "llm_labels": torch.cat(labels)}


def blip2_batch(config: Blip2Config, batch: int, caption: int) -> dict:
    """BLIP-2's rows `<image>xn [bos] caption [eos]`, labelled on the caption and its end."""
    g = torch.Generator().manual_seed(0)
    n, k, size = config.num_query_tokens, config.image_token_index, config.vision_config.image_size
    words, ones = random_ids(g, (batch, caption), 3, k), torch.ones(batch, 1, dtype=torch.long)
    ids = torch.cat([torch.full((batch, n), k), ones, words, ones * 2], 1)
    labels = torch.cat([torch.full((batch, n + 1), IGNORE_INDEX), words, ones * 2], 1)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": labels}


def make_trainer(model, optim: str = OPTIM) -> Trainer:
    """The Trainer `train_pretrain.py` builds (VIKDF) or a plain one (BLIP-2), with its optimizer created."""
    training = PretrainTrainingArguments(output_dir=tempfile.gettempdir(), precision="auto", optim=optim,
                                         report_to="none", use_cpu=model.device.type == "cpu", max_grad_norm=1.0)
    trainer = (VIKDFPretrainTrainer if isinstance(model, VIKDFForConditionalGeneration) else Trainer)(
        model=model, args=training)
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`'s loop, which this benchmark does not run
    trainer.create_optimizer()
    return trainer


def train_step(trainer: Trainer, batch: dict) -> tuple[float, float]:
    """One optimizer step as `Trainer`'s loop takes it at accumulation 1: (forward + backward s, optimizer s)."""
    model, device = trainer.model, trainer.model.device
    common.synchronize(device)
    start = time.perf_counter()
    # `train()` gets mixed precision from accelerate's prepared model; called alone, the step opens it here.
    with trainer.accelerator.autocast():
        trainer.training_step(model, batch, trainer._get_num_items_in_batch([batch], device))
    common.synchronize(device)
    middle = time.perf_counter()
    trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    model.zero_grad()
    common.synchronize(device)
    return middle - start, time.perf_counter() - middle


@contextmanager
def switched(model, passes=PretrainingPasses(), checkpointing=None, compiled=False):
    """The model with one ablation's setting, restored after."""
    original = getattr(model, "iq_former", None)
    model.pretraining_passes = passes
    if checkpointing == "llm":
        model.activation_checkpointing_enable()  # the model's own: the frozen LLM only
    elif checkpointing == "all":
        PreTrainedModel.activation_checkpointing_enable(model)  # transformers' generic one: every layer
    if compiled:
        model.iq_former = torch.compile(original)
    try:
        yield
    finally:
        model.pretraining_passes = PretrainingPasses()
        if checkpointing:
            model.activation_checkpointing_disable()
        if compiled:
            model.iq_former = original


class Bench:
    """A model in training mode, its batches (one micro-batch in memory at a time) and its measurements."""

    def __init__(self, model, make_batch, args, dtype):
        self.model, self.make_batch, self.args, self.dtype = model.train(), make_batch, args, dtype
        self.device, self.batches = model.device, {}

    def batch(self, size: int, cached: bool = False) -> dict:
        if size not in self.batches:
            self.batches = {size: self.make_batch(size)}
        batch = self.batches[size]
        if cached:  # a feature cache's clean-image states, copied to the device each step with the batch
            with torch.no_grad(), torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
                states = self.model.encode_image(batch["pixel_values"].to(self.device)).cpu()
            batch = {**batch, "image_states": states.pin_memory() if self.device.type == "cuda" else states}
        return batch

    def measure(self, size: int, optim: str = OPTIM, cached: bool = False, **setting):
        """A measurement: warm-up and timed steps of a fresh Trainer; per step its phases, the peak memory."""
        def run():
            trainer, batch = make_trainer(self.model, optim), self.batch(size, cached)
            memory = common.PeakMemory(self.device)
            hook = self.model.register_forward_hook(memory.poll)  # CPU: activations peak at the forward's end
            try:
                with switched(self.model, **setting):
                    for _ in range(self.args.warmup):
                        train_step(trainer, batch)
                    with memory:
                        phases = [train_step(trainer, batch) for _ in range(self.args.steps)]
            finally:
                hook.remove()
                del trainer
                common.free_memory(self.device)
            return {"step_s": [sum(p) for p in phases], "optimizer_s": [p[1] for p in phases],
                    "peak_gib": [memory.peak_gib]}
        return run

    def flops(self, size: int) -> dict:
        with FlopCounterMode(display=False) as counter:
            train_step(make_trainer(self.model), self.batch(size))
        return {"flops": float(counter.get_total_flops())}


def main_rows(name: str, bench: Bench, sizes: list[int], llm_tokens, peak: float | None) -> list[dict]:
    """Per micro-batch the medians, throughput, FLOPs, MFU and (`--projection`) the paper schedule's wall time."""
    args, rows = bench.args, []
    with switched(bench.model, checkpointing="llm" if args.gradient_checkpointing else None):
        measured = common.interleaved([bench.measure(size) for size in sizes], args.rounds, bench.device)
        for size, runs in zip(sizes, measured):
            rows.append({"model": name, "micro_batch": size, **common.medians(runs, "step_s", "optimizer_s")})
            if "error" in rows[-1]:
                continue
            step, flops = rows[-1]["step_s"], common.guarded(lambda: bench.flops(size), bench.device).get("flops")
            rows[-1].update(samples_per_s=size / step, llm_tokens_per_s=llm_tokens(size) / step, flops=flops,
                            mfu=flops / step / (peak * 1e12) if flops and peak else None)
            if args.projection:  # ideal data parallelism: accumulation makes up the global batch
                rows[-1]["hours"] = PAPER_STEPS * PAPER_GLOBAL_BATCH / (args.gpus * size) * step / 3600
    return rows


def ablation_rows(bench: Bench, size: int, letters: list[str]) -> list[dict]:
    """Per ablation the settings timed interleaved on the same model and batch; speed-up = before / after step."""
    rows = []
    for letter in letters:
        what, settings = ABLATIONS[letter]
        measured = common.interleaved([bench.measure(size, **s) for s in settings.values()], bench.args.rounds,
                                      bench.device)
        (before_name, *after_names), (before, *afters) = settings, [common.medians(runs, "step_s") for runs in measured]
        for after_name, after in zip(after_names, afters):
            rows.append({"ablation": letter, "what": what, "before": before_name, "after": after_name,
                         "before_result": before, "after_result": after})
            if "error" not in before and "error" not in after:
                rows[-1].update(speedup=before["step_s"] / after["step_s"],
                                memory_ratio=after["peak_gib"] / before["peak_gib"])
    return rows


def render(args, meta: dict, results: list[dict], ablations: list[dict]) -> list[str]:
    ms = lambda r: r.get("error") or f"{1e3 * r['step_s']:,.1f}"  # noqa: E731
    projected = [f"hours for {PAPER_STEPS:,} x {PAPER_GLOBAL_BATCH} on {args.gpus} GPU(s)"] if args.projection else []
    main = [[r["model"], r["micro_batch"], r["error"]] if "error" in r else
            [r["model"], r["micro_batch"], common.fmt(r["samples_per_s"]), common.fmt(r["llm_tokens_per_s"], 0),
             f"{ms(r)} ({1e3 * r['optimizer_s']:,.1f})", common.fmt(r["peak_gib"], 3),
             common.fmt(r["flops"] and r["flops"] / 1e9, 3), "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
             *([common.fmt(r["hours"], 1)] if projected else [])] for r in results]
    out = [f"- {meta['dtype']}, optimizer {OPTIM}, checkpointing "
           f"{'the LLM (--activation_checkpointing)' if args.gradient_checkpointing else 'off'}; LLM rows: VIKDF 2B x "
           f"{meta['vikdf_llm_len']}, BLIP-2 B x {meta['blip2_llm_len']}; {args.rounds} interleaved round(s) of "
           f"{args.warmup} + {args.steps} steps; peak FLOP/s {meta['peak_source']}; memory {meta['memory']}", "",
           "## Step time per micro-batch", "",
           common.markdown_table(["model", "micro-batch", "samples/s", "LLM tokens/s", "step ms (optimizer)",
                                  "peak GiB", "GFLOP/step (FlopCounterMode)", "MFU", *projected], main)]
    if ablations:
        out += ["", f"## Ablations at micro-batch {meta['ablation_micro_batch']} (speed-up = before / after step time; "
                "memory = after / before peak)", "", common.markdown_table(
                    ["ablation", "before", "after", "before ms", "after ms", "speed-up", "memory"],
                    [[f"({a['ablation']}) {a['what']}", a["before"], a["after"], ms(a["before_result"]),
                      ms(a["after_result"]), common.fmt(a.get("speedup"), 3), common.fmt(a.get("memory_ratio"), 3)]
                     for a in ablations], align="lllrrrr")]
    return out


def main(argv=None):
    p = common.argument_parser(__doc__, sizes=("tiny", "medium", "paper"))
    p.add_argument("--micro_batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true", help="the Trainer's, in the main rows")
    p.add_argument("--caption_tokens", type=int, default=20)
    p.add_argument("--prompt_tokens", type=int, default=12)
    p.add_argument("--no_blip2", action="store_true", help="skip the BLIP-2 reference")
    p.add_argument("--ablations", nargs="*", default=["a", "b", "c", "d", "f", "g", "h"], choices=sorted(ABLATIONS),
                   help="which ablations to time, at the largest micro-batch (e, torch.compile, is slow on a CPU)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak FLOP/s for MFU (default: the GPU table)")
    p.add_argument("--projection", action="store_true", help="project the paper's 100k x 128 schedule")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for --projection (ideal data parallelism)")
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    args.rounds = args.rounds or (3 if device.type == "cpu" else 2)
    peak, source = common.peak_tflops(device, dtype, args.peak_tflops)
    sizes, config = sorted(set(args.micro_batch_sizes)), common.model_config(args.size, args.llm_layers)
    n = config.num_query_tokens
    meta = {"dtype": str(dtype), "peak_tflops": peak, "peak_source": source, "memory": common.PeakMemory(device).method,
            "vikdf_llm_len": n + args.prompt_tokens + args.caption_tokens + 2, "ablation_micro_batch": sizes[-1],
            "blip2_llm_len": n + args.caption_tokens + 2}

    model = common.build_random_model(VIKDFForConditionalGeneration, config, device, dtype)
    model.set_trainable_stage("pretrain")
    bench = Bench(model, lambda b: vikdf_batch(model.config, b, args.caption_tokens, args.prompt_tokens), args, dtype)
    results = main_rows("VIKDF", bench, sizes, lambda b: 2 * b * meta["vikdf_llm_len"], peak)
    ablations = ablation_rows(bench, sizes[-1], args.ablations)
    del bench, model  # one model in memory at a time
    common.free_memory(device)
    if not args.no_blip2:
        model = common.build_random_model(Blip2ForConditionalGeneration, blip2_config(config), device, dtype)
        for name, parameter in model.named_parameters():  # BLIP-2 trains its queries, Q-Former and projection
            parameter.requires_grad = name.split(".")[0] in ("query_tokens", "qformer", "language_projection")
        bench = Bench(model, lambda b: blip2_batch(model.config, b, args.caption_tokens), args, dtype)
        results += main_rows("BLIP-2", bench, sizes, lambda b: b * meta["blip2_llm_len"], peak)

    stem, label = common.result_stem("pretrain_step", args, device)
    cpu_note = " (CPU: not representative of a GPU)" if device.type == "cpu" else ""
    common.publish(stem, f"VIKDF pre-training step, size {label}{cpu_note}", render(args, meta, results, ablations),
                   {"meta": meta, "args": vars(args), "results": results, "ablations": ablations},
                   args.output_dir, device)


if __name__ == "__main__":
    main()
