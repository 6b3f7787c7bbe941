"""Time the pre-training step `vikdf.training.trainers.VIKDFPretrainTrainer` runs, and BLIP-2's LM step beside it.

    python benchmarks/bench_pretrain_step.py                                    # tiny shapes, this machine
    python benchmarks/bench_pretrain_step.py --size paper --micro_batch_sizes 1 2 4 8 16 32 --projection --gpus 1
    python benchmarks/bench_pretrain_step.py --size paper --llm_layers 2 --micro_batch_sizes 1   # CPU: true widths
    python benchmarks/bench_pretrain_step.py --size medium --micro_batch_sizes 8 --caption_tokens 39 --ablations g

A step is the Trainer's own: `training_step` (the forward, `compute_loss`'s weighted objectives, backward) on a
batch in `PretrainCollator`'s format filled with random values of the real shapes, then the gradient clipping, the
optimizer step and `zero_grad` of `Trainer`'s loop, with `PretrainTrainingArguments`' optimizer settings. BLIP-2
(`Blip2ForConditionalGeneration` with VIKDF's vision tower, its IQ-Former shape as the Q-Former and the same LLM;
queries, Q-Former and projection trained) runs the same step through a plain `Trainer`. FLOPs per step are what
`torch.utils.flop_counter.FlopCounterMode` counts in one step; MFU divides them by the step time and the peak
(`--peak_tflops`, else `_bench_common.PEAK_BF16_TFLOPS`).

Sizes: tiny = `vikdf.testing.tiny_vikdf_config`; medium = every tower 256 wide and 4 deep with Llama-2's vocabulary,
where the LM head's share of the step is as large as at paper size; paper = `VIKDFConfig()` (CLIP ViT-L/14,
BERT-base IQ-Former, n = 32, Llama-2-7B shapes). LLM rows are `[bos] <k>xn prompt caption [eos]` (IACI) and
`[bos] prompt caption <k>xn` (IAKR), 2B rows in all.

Ablations (`--ablations`, at the largest micro-batch; speed-up = before / after step time): each row switches the
model (`PretrainingPasses`, checkpointing, a compiled IQ-Former, cached image states in the batch) or the Trainer's
optimizer, and times both settings interleaved on the same model and batch.
"""

from __future__ import annotations

import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import BertConfig, Blip2Config, Blip2ForConditionalGeneration, CLIPConfig, PreTrainedModel, Trainer  # noqa: E402

from configuration_vikdf import LLAMA_2_7B, VIKDFConfig  # noqa: E402
from modeling_vikdf import PretrainingPasses, VIKDFForConditionalGeneration  # noqa: E402
from vikdf.training.arguments import PretrainTrainingArguments  # noqa: E402
from vikdf.training.components import iq_former_config_from_bert  # noqa: E402
from vikdf.training.losses import IGNORE_INDEX  # noqa: E402
from vikdf.training.masking import mask_caption_tokens, tamim_pixel_masks  # noqa: E402
from vikdf.testing import tiny_llm_config, tiny_vikdf_config  # noqa: E402
from vikdf.training.trainers import VIKDFPretrainTrainer  # noqa: E402

PAPER_STEPS, PAPER_GLOBAL_BATCH = 100_000, 128
# letter: (what, settings), the first setting the "before"; each setting is `switched`'s keywords.
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
    "g": ("LM-head logits", {
        "every position of every row": {"passes": PretrainingPasses(caption_logits_only=False)},
        "IACI caption positions (the trainer)": {}}),
    "h": ("IAMTM vocabulary logits", {
        "every caption token": {"passes": PretrainingPasses(masked_token_logits_only=False)},
        "masked tokens only (the trainer)": {}}),
}


def vikdf_config(args) -> VIKDFConfig:
    if args.size == "tiny":
        text = tiny_llm_config(args.llm_family).to_dict()
        text["num_hidden_layers"] = args.llm_layers or text["num_hidden_layers"]
        return tiny_vikdf_config(args.llm_family, text_config=text)
    if args.size == "medium":
        return medium_vikdf_config(args.llm_layers or 4)
    text = {**LLAMA_2_7B, "vocab_size": 32001, "pad_token_id": 0}
    text["num_hidden_layers"] = args.llm_layers or text["num_hidden_layers"]
    return VIKDFConfig(text_config=text, knowledge_token_id=32000)


def medium_vikdf_config(llm_layers: int = 4) -> VIKDFConfig:
    """Width 256, 4 layers everywhere: CLIP at 112 px (patch 14) with CLIP's 49,408-token vocabulary, an IQ-Former
    of 32 queries, a Llama of Llama-2's 32k vocabulary (+ `<knowledge>`)."""
    tower = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    clip = CLIPConfig(text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
                      vision_config=dict(tower, image_size=112, patch_size=14), projection_dim=256)
    text = {**LLAMA_2_7B, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": llm_layers,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32001, "pad_token_id": 0}
    return VIKDFConfig(clip_config=clip.to_dict(), qformer_config=iq_former_config_from_bert(BertConfig(**tower), 256)
                       .to_dict(), text_config=text, knowledge_token_id=32000, head_num_attention_heads=4,
                       head_intermediate_size=1024)


def blip2_config(vikdf: VIKDFConfig) -> Blip2Config:
    """BLIP-2 with VIKDF's vision tower, its IQ-Former shape as the Q-Former (cross-attending to the vision width,
    as BLIP-2's does) and the same LLM; the image placeholder is VIKDF's knowledge id."""
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


def vikdf_batch(config: VIKDFConfig, batch: int, caption: int, prompt: int, seed: int) -> dict:
    """One micro-batch of `PretrainCollator`'s keys, on the CPU as the collator leaves it."""
    g = torch.Generator().manual_seed(seed)
    size = config.clip_config.vision_config.image_size
    masks = tamim_pixel_masks(size, size, batch_size=batch, patch_size=config.mask_patch_size,
                              subpatch_size=config.clip_config.vision_config.patch_size, mask_ratio=config.mask_ratio,
                              keep_ratio=config.mask_keep_ratio, generator=g)
    text = config.clip_config.text_config
    special = (text.bos_token_id, text.eos_token_id, text.pad_token_id)
    body = random_ids(g, (batch, caption), 0, text.vocab_size, exclude=special)
    ones = torch.ones(batch, 1, dtype=torch.long)
    clip_ids = torch.cat([ones * text.bos_token_id, body, ones * text.eos_token_id], 1)
    masked_ids, mlm_labels = mask_caption_tokens(
        clip_ids, text.eos_token_id, attention_mask=torch.ones_like(clip_ids), special_token_ids=set(special),
        mask_ratio=config.text_mask_ratio, keep_ratio=config.text_mask_keep_ratio, generator=g)
    n, k = config.num_query_tokens, config.knowledge_token_id
    words, slots = random_ids(g, (batch, prompt + caption), 3, k), torch.full((batch, n), k)
    iaci = torch.cat([ones, slots, words, ones * 2], 1)  # ids 1, 2: the LLM's bos and eos
    labels = [torch.cat([torch.full((batch, 1 + n + prompt), IGNORE_INDEX), words[:, prompt:], ones * 2], 1)]
    rows, masks_ = [iaci], [torch.ones_like(iaci)]
    if config.use_bvif:
        iakr = torch.cat([ones, words, slots, torch.zeros(batch, 1, dtype=torch.long)], 1)  # padded to IACI's width
        rows.append(iakr)
        masks_.append(torch.cat([torch.ones(batch, iakr.shape[1] - 1, dtype=torch.long), ones * 0], 1))
        labels.append(torch.full_like(iakr, IGNORE_INDEX))
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g), "pixel_mask": masks.scored,
            "pixel_replaced_mask": masks.replaced, "clip_input_ids": clip_ids,
            "clip_attention_mask": torch.ones_like(clip_ids), "clip_masked_input_ids": masked_ids,
            "clip_mlm_labels": mlm_labels, "llm_input_ids": torch.cat(rows), "llm_attention_mask": torch.cat(masks_),
            "llm_labels": torch.cat(labels)}


def blip2_batch(config: Blip2Config, batch: int, caption: int, seed: int) -> dict:
    """BLIP-2's rows `<image>xn [bos] caption [eos]`, labelled on the caption and its end."""
    g = torch.Generator().manual_seed(seed)
    n, k, size = config.num_query_tokens, config.image_token_index, config.vision_config.image_size
    words, ones = random_ids(g, (batch, caption), 3, k), torch.ones(batch, 1, dtype=torch.long)
    ids = torch.cat([torch.full((batch, n), k), ones, words, ones * 2], 1)
    labels = torch.cat([torch.full((batch, n + 1), IGNORE_INDEX), words, ones * 2], 1)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": labels}


def make_trainer(model, args, dtype, optim: str) -> Trainer:
    """The Trainer `train_pretrain.py` builds (VIKDF) or a plain one (BLIP-2), with its optimizer created."""
    training = PretrainTrainingArguments(
        output_dir=tempfile.gettempdir(), precision=common.dtype_name(dtype), optim=optim, report_to="none",
        use_cpu=model.device.type == "cpu", max_grad_norm=1.0)
    trainer = (VIKDFPretrainTrainer if isinstance(model, VIKDFForConditionalGeneration) else Trainer)(
        model=model, args=training)
    trainer.current_gradient_accumulation_steps = 1  # set by `train()`'s loop, which this benchmark does not run
    trainer.create_optimizer()
    return trainer


def train_step(trainer: Trainer, batch: dict, device: torch.device) -> tuple[float, float]:
    """One optimizer step as `Trainer`'s loop takes it at accumulation 1: (forward + backward s, optimizer s)."""
    model = trainer.model
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
def switched(model, passes=PretrainingPasses(), checkpointing=None, compiled=False, **_):
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
    """A model, its batches and its measurements."""

    def __init__(self, model, make_batch, args, device, dtype):
        self.model, self.make_batch, self.args, self.device, self.dtype = model, make_batch, args, device, dtype
        self.model.train()
        self.batches: dict[int, dict] = {}

    def batch(self, size: int, cached: bool = False) -> dict:
        if size not in self.batches:
            self.batches = {size: self.make_batch(size)}  # one micro-batch in memory at a time
        batch = self.batches[size]
        if cached:  # a feature cache's clean-image states, copied to the device each step with the batch
            with torch.no_grad(), torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
                states = self.model.encode_image(batch["pixel_values"].to(self.device)).cpu()
            batch = {**batch, "image_states": states.pin_memory() if self.device.type == "cuda" else states}
        return batch

    def measure(self, size: int, optim: str | None = None, **setting):
        """A measurement: warm-up and timed steps of a fresh Trainer; per step its phases, the peak memory."""
        def run():
            trainer = make_trainer(self.model, self.args, self.dtype, optim or self.args.optim)
            batch, memory = self.batch(size, setting.get("cached", False)), common.PeakMemory(self.device)
            hook = self.model.register_forward_hook(memory.poll)  # CPU: activations peak at the forward's end
            try:
                with switched(self.model, **setting):
                    for _ in range(self.args.warmup):
                        train_step(trainer, batch, self.device)
                    with memory:
                        phases = [train_step(trainer, batch, self.device) for _ in range(self.args.steps)]
            finally:
                hook.remove()
                del trainer
                common.free_memory(self.device)
            return {"step_s": [sum(p) for p in phases], "optimizer_s": [p[1] for p in phases],
                    "peak_gib": [memory.peak_gib]}
        return run

    def counted_flops(self, size: int) -> float:
        trainer = make_trainer(self.model, self.args, self.dtype, self.args.optim)
        with FlopCounterMode(display=False) as counter:
            train_step(trainer, self.batch(size), self.device)
        return float(counter.get_total_flops())


def row(runs: list[dict]) -> dict:
    """Medians over the rounds' timed steps and the largest peak, or the first error."""
    step = common.median_of(runs, "step_s")
    if isinstance(step, dict):
        return step
    return {"step_s": step, "optimizer_s": common.median_of(runs, "optimizer_s"),
            "peak_gib": max(r["peak_gib"][0] for r in runs)}


def main_rows(name: str, bench: Bench, sizes: list[int], llm_tokens, peak: float | None) -> list[dict]:
    rows = []
    with switched(bench.model, checkpointing="llm" if bench.args.gradient_checkpointing else None):
        measured = common.interleaved([bench.measure(size) for size in sizes], bench.args.rounds, bench.device)
        for size, runs in zip(sizes, measured):
            result = {"model": name, "micro_batch": size, **row(runs)}
            if "error" not in result:
                flops = common.guarded(lambda: {"flops": bench.counted_flops(size)}, bench.device).get("flops")
                step = result["step_s"]
                result.update(samples_per_s=size / step, llm_tokens_per_s=llm_tokens(size) / step, flops=flops,
                              mfu=flops / step / (peak * 1e12) if flops and peak else None)
            rows.append(result)
            print(f"{name} micro-batch {size}: {result}", flush=True)
    return rows


def ablation_rows(bench: Bench, size: int, letters: list[str]) -> list[dict]:
    rows = []
    for letter in letters:
        what, settings = ABLATIONS[letter]
        measured = common.interleaved([bench.measure(size, **s) for s in settings.values()], bench.args.rounds,
                                      bench.device)
        (before_name, *after_names), (before, *afters) = list(settings), [row(runs) for runs in measured]
        for after_name, after in zip(after_names, afters):
            result = {"ablation": letter, "what": what, "before": before_name, "after": after_name,
                      "before_result": before, "after_result": after}
            if "error" not in before and "error" not in after:
                result.update(speedup=before["step_s"] / after["step_s"],
                              memory_ratio=after["peak_gib"] / before["peak_gib"])
            rows.append(result)
            print(f"({letter}) {before_name} -> {after_name}: {common.fmt(result.get('speedup'), 3)}", flush=True)
    return rows


def render(args, meta: dict, results: list[dict], ablations: list[dict], projections: list[dict]) -> list[str]:
    ms = lambda r: r.get("error") or f"{1e3 * r['step_s']:,.1f}"  # noqa: E731
    out = [f"- dtype {meta['dtype']}, attention {args.attn_implementation}, optimizer {args.optim}, checkpointing "
           f"{'the LLM (--activation_checkpointing)' if args.gradient_checkpointing else 'off'}; LLM rows: VIKDF 2B x "
           f"{meta['vikdf_llm_len']}, BLIP-2 B x {meta['blip2_llm_len']}; {meta['rounds']} interleaved round(s) of "
           f"{args.warmup} warm-up + {args.steps} timed steps, medians; peak FLOP/s {meta['peak_source']}; memory "
           f"{meta['memory']}", "", "## Step time per micro-batch", "",
           common.markdown_table(
               ["model", "micro-batch", "samples/s", "LLM tokens/s", "step ms (optimizer)", "peak GiB",
                "GFLOP/step (FlopCounterMode)", "MFU"],
               [[r["model"], r["micro_batch"], r["error"], "", "", "", "", ""] if "error" in r else
                [r["model"], r["micro_batch"], common.fmt(r["samples_per_s"]), common.fmt(r["llm_tokens_per_s"], 0),
                 f"{ms(r)} ({1e3 * r['optimizer_s']:,.1f})", common.fmt(r["peak_gib"], 3),
                 common.fmt(r["flops"] and r["flops"] / 1e9, 3), "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"]
                for r in results])]
    if ablations:
        out += ["", f"## Ablations at micro-batch {meta['ablation_micro_batch']} (speed-up = before / after step time; "
                "memory = after / before peak)", "", common.markdown_table(
                    ["ablation", "before", "after", "before ms", "after ms", "speed-up", "memory"],
                    [[f"({a['ablation']}) {a['what']}", a["before"], a["after"], ms(a["before_result"]),
                      ms(a["after_result"]), common.fmt(a.get("speedup"), 3), common.fmt(a.get("memory_ratio"), 3)]
                     for a in ablations], align="lllrrrr")]
    if projections:
        out += ["", f"## {PAPER_STEPS:,} steps x global batch {PAPER_GLOBAL_BATCH} on {args.gpus} such GPUs", "",
                "Ideal data parallelism: each GPU at the measured step time, accumulation makes up the global batch, "
                "all-reduce, data loading and saving cost nothing.", "",
                common.markdown_table(["model", "micro-batch", "s / global step", "hours"],
                                      [[p["model"], p["micro_batch"], common.fmt(p["global_step_s"], 3),
                                        common.fmt(p["hours"], 1)] for p in projections])]
    return out


def parse_args(argv=None):
    p = common.argument_parser(__doc__, sizes=("tiny", "medium", "paper"))
    p.add_argument("--micro_batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="in the main rows, as the Trainer's --activation_checkpointing switches it on")
    p.add_argument("--caption_tokens", type=int, default=20)
    p.add_argument("--prompt_tokens", type=int, default=12)
    p.add_argument("--optim", default="adamw_torch_fused", help="the Trainer's --optim in the main rows")
    p.add_argument("--no_blip2", action="store_true", help="skip the BLIP-2 reference")
    p.add_argument("--ablations", nargs="*", default=["a", "b", "c", "d", "f", "g", "h"], choices=sorted(ABLATIONS),
                   help="which ablations to time (e, torch.compile, is slow to compile on a CPU)")
    p.add_argument("--ablation_micro_batch", type=int, default=None, help="default: the largest micro-batch")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak FLOP/s for MFU (default: the GPU table)")
    p.add_argument("--projection", action="store_true", help="project the paper's 100k x 128 schedule")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for --projection (ideal data parallelism)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = common.setup(args)
    args.rounds = args.rounds or (3 if device.type == "cpu" else 2)
    peak, source = (args.peak_tflops, "--peak_tflops") if args.peak_tflops else common.default_peak_tflops(device, dtype)
    sizes = sorted(set(args.micro_batch_sizes))
    config = vikdf_config(args)
    n = config.num_query_tokens
    vikdf_len, blip2_len = 1 + n + args.prompt_tokens + args.caption_tokens + 1, n + args.caption_tokens + 2
    meta = {"dtype": common.dtype_name(dtype), "peak_tflops": peak, "peak_source": source, "rounds": args.rounds,
            "memory": common.PeakMemory(device).method, "vikdf_llm_len": vikdf_len, "blip2_llm_len": blip2_len,
            "ablation_micro_batch": args.ablation_micro_batch or sizes[-1]}

    model = common.build_random_model(VIKDFForConditionalGeneration, config, device, dtype, args.attn_implementation)
    model.set_trainable_stage("pretrain")
    meta.update(vikdf_parameters=common.count_parameters(model), vikdf_trained=common.count_parameters(model, True))
    bench = Bench(model, lambda b: vikdf_batch(model.config, b, args.caption_tokens, args.prompt_tokens, args.seed),
                  args, device, dtype)
    results = main_rows("VIKDF", bench, sizes, lambda b: 2 * b * vikdf_len, peak)
    ablations = ablation_rows(bench, meta["ablation_micro_batch"], args.ablations)
    del bench, model  # one model in memory at a time
    common.free_memory(device)

    if not args.no_blip2:
        model = common.build_random_model(Blip2ForConditionalGeneration, blip2_config(config), device, dtype,
                                          args.attn_implementation)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.split(".")[0] in ("query_tokens", "qformer", "language_projection")
        bench = Bench(model, lambda b: blip2_batch(model.config, b, args.caption_tokens, args.seed), args, device, dtype)
        results += main_rows("BLIP-2", bench, sizes, lambda b: b * blip2_len, peak)

    projections = [
        {"model": r["model"], "micro_batch": r["micro_batch"], "global_step_s": step,
         "hours": PAPER_STEPS * step / 3600}
        for r in results if args.projection and "error" not in r
        for step in [PAPER_GLOBAL_BATCH / args.gpus / r["micro_batch"] * r["step_s"]]
    ]
    label = args.size + (f"-{args.llm_family}" if args.llm_family != "llama" else "") + \
        (f"-llm{args.llm_layers}L" if args.llm_layers else "")
    common.publish(f"pretrain_step_{common.device_slug(device)}_{label}" + (f"_{args.tag}" if args.tag else ""),
                   f"VIKDF pre-training step, size {label}" + (" (CPU: not representative of a GPU)"
                                                              if device.type == "cpu" else ""),
                   render(args, meta, results, ablations, projections),
                   {"meta": meta, "args": vars(args), "results": results, "ablations": ablations,
                    "projection": projections}, args.output_dir, device)


if __name__ == "__main__":
    main()
