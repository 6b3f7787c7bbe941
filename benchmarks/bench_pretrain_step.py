"""Time one VIKDF pre-training step (forward + backward + grad clipping + AdamW step of the trained parts) and, in the
same run, BLIP-2's ordinary LM training step with the same vision width, Q-Former and LLM.

    python benchmarks/bench_pretrain_step.py                                   # tiny shapes, this machine
    python benchmarks/bench_pretrain_step.py --size paper --micro_batch_sizes 1 2 4 8 16 32 --projection --gpus 1
    python benchmarks/bench_pretrain_step.py --size paper --llm_layers 2 --micro_batch_sizes 1   # CPU: true widths
    python benchmarks/bench_pretrain_step.py --size paper --flops_only         # FLOPs per sample, analytic wall time

What is timed
-------------
The step is the one `vikdf.trainers.VIKDFPretrainTrainer` runs: the batch has the collator's format
(`vikdf.data.collators.PretrainCollator`: pixels, TAMIM pixel mask, clean + IAMTM-masked CLIP caption, IACI rows then
IAKR rows for the LLM), random values of the real shapes; the losses come from the trainer's own
pre-training forward (one frozen vision pass for clean + masked images, one text-tower pass for clean + masked
captions, IACI and IAKR rows in one LLM call), are normalised as `compute_loss` does, then `loss.backward()`,
`clip_grad_norm_(1.0)` (the Trainer's default `max_grad_norm`) and `AdamW(lr=1e-4, weight_decay=0.05)` over the
trained parts (queries, IQ-Former, heads, projections), as `train_pretrain.py` sets up. Mixed precision is the
Trainer's `--bf16`: weights in bf16 except the IQ-Former and its queries (fp32, `_keep_in_fp32_modules`, as
`from_pretrained(dtype=bf16)` leaves them), run under `torch.autocast(bf16)`.

Sizes: `tiny` = `vikdf.testing.tiny_vikdf_config` (32-pixel images, width 32-64, 2 layers, n = 8) and a BLIP-2 of
matching tiny shapes; `paper` = `VIKDFConfig()` defaults: CLIP ViT-L/14 (224 px, 257 vision tokens, width 1024,
projection 768; text width 768), BERT-base IQ-Former (12 layers, cross-attention every 2nd), n = 32, Llama-2-7B
shapes (32 layers, width 4096, vocab 32000 + the `<knowledge>` token = 32001), random weights. `--llm_layers N`
cuts the LLM to N layers (everything else at full width) so that the non-LLM parts can be timed on a small machine.
`medium` = `medium_vikdf_config`: every tower 256 wide and 4 deep (CLIP at 112 px, patch 14; IQ-Former with n = 32;
a Llama with Llama-2's vocabulary), where the LM head's share of the step is as large as at paper size:

    python benchmarks/bench_pretrain_step.py --size medium --micro_batch_sizes 8 --caption_tokens 39 --ablations g

LLM rows (IACI / IAKR, paper eq. 6-8): `[bos] <k>xn {prompt} {caption}[eos]` and `[bos] {prompt} {caption} <k>xn`
(padded to the same length), so one row has S = 1 + n + prompt_tokens + caption_tokens + 1 tokens and a step has
2B rows. The CLIP caption has caption_tokens + 2 tokens (start/end of text), as the collator pads to the batch's
longest caption. BLIP-2's row is `<image>xn [bos] {caption}[eos]`: n + caption_tokens + 2 tokens, B rows.
"tokens/s" counts LLM tokens (rows x row length).

FLOPs per step (model FLOPs: what the maths needs, no recomputation from checkpointing; written out in
`vikdf_step_flops` / `blip2_step_flops`, cross-checked against `torch.utils.flop_counter.FlopCounterMode`)
--------------------------------------------------------------------------------------------------------------
A linear map of d_in -> d_out on T tokens costs 2*T*d_in*d_out forward. Backward costs the same again for the
input gradient (needed when anything before it trains) and again for the weight gradient (when it trains). So:
  frozen and under no_grad (CLIP towers)                            x1
  frozen, gradient flows through it to trained inputs (the LLM)      x2   (forward + input grads, no weight grads)
  trained, input needs a gradient                                    x3   (forward + input + weight grads)
  trained, input is frozen data (K/V maps of CLIP states in the IQ-Former's cross-attention, the q map of the
  TAMIM/IAMTM blocks over frozen masked-modality states)            x2   (forward + weight grads)
  attention core QK^T and AV (no weights): 4*T_q*T_kv*d forward, x3 whenever a gradient flows, as both operands
  need theirs; causal masks are not halved (PaLM's convention).
Terms (B = micro-batch, n = queries, D = IQ-Former width, E = CLIP projection width, L_c = CLIP caption length,
P = 1 + (image/patch)^2 vision tokens, S = LLM row length, H/F/V = LLM width/MLP width/vocab, H_kv = kv width):
  CLIP transformer layer on T tokens of width d, MLP f:  2T(4d^2 + 2df) + 4T^2 d
  CLIP text, frozen x1:   2B captions (clean + masked), L_c tokens, 12 layers, + projection 2 L_c d_t E
  CLIP vision, frozen x1: 2B images (clean + masked), P tokens, 24 layers, + patch conv 2(P-1)(3p^2)d_v
                          + projection 2 P d_v E
  IQ-Former on n queries, encoder length T_e (text: L_c, image: P), every layer: self-attention 2n*4D^2 +
     core 4n^2 D, query FFN 2n*2DF_q; every 2nd layer cross-attention: q,o 2n*2D^2 + k,v 2T_e*2ED (x2) + core
     4nT_e D. Trained (x3 except k,v). Run twice per sample: on text states (K_T) and on image states (K_I).
  TIM: two D->256 maps on query 0 + the BxB similarity (negligible); TAMIM block on P tokens against n knowledge
     vectors (q map x2, k,v,o, core, FFN x3) + 1x1 conv E -> 3p^2 on P-1 tokens; IAMTM block on L_c tokens + the
     E -> 49408 vocabulary map on the masked ones (0.15 (L_c - 2) expected); language_projection D->H on n slots of 2B rows; IAKR head H->D on
     n positions of B rows. All trained, x3.
  LLM (frozen, x2 / core x3): 2B rows of S tokens, per layer 2S(2H^2 + 2H H_kv + 3HF) + 4S^2 H; LM head 2SHV on the
     caption positions of the B IACI rows only (the trainer's `logits_positions`).
  BLIP-2: vision x1 on B images (no projection), Q-Former x3 on P tokens of width d_v, language_projection x3,
     LLM x2 on B rows of n + caption + 2 tokens with the LM head on all of them.
LayerNorms, softmaxes, GELUs, embeddings lookups and the losses are left out (well under 1 %).
MFU = FLOPs per step / step time / peak FLOP/s. The peak is `--peak_tflops`, else the dense bf16 spec of the GPU
(`_bench_common.PEAK_BF16_TFLOPS`: H200/H100 SXM 989.4, RTX 4090 165.2, ...); on CPU MFU is n/a unless given.

Ablations (`--ablations a b c d e f`, at `--ablation_micro_batch`, same machine, same run; ratio = before/after step
time, > 1 means the "after" is faster): (a) one batched frozen vision pass for clean + masked images vs two passes;
(b) IACI + IAKR rows in one LLM call vs two calls; (c) gradient checkpointing of the frozen LLM only (the model's
`activation_checkpointing_enable`, what the Trainer's flag calls), and of every layer (transformers' generic
switch, which the model overrides) (memory vs time); (d) AdamW for-loop -> foreach ->
fused; (e) `torch.compile` of the IQ-Former (skipped with the reason if it fails); (f) cached CLIP features of the
clean image (precomputed vision states, copied from host memory each step) -> no clean vision forward; (g) the LM
head on every position of every row, IAKR rows included, with the logits kept for backward (the code before
`logits_positions`) -> on the IACI rows' caption positions only (the trainer); (h) the IAMTM vocabulary
head on every caption token (the earlier code) -> on the masked tokens only (the trainer). Each variant switches a
stage of the model's pre-training forward (`PretrainingPasses`) and is checked to give the same losses (eval mode, before timing).

Projection (`--projection --gpus G`): wall time of the paper's schedule, 100k steps x global batch 128, from the
measured step time T(b) at micro-batch b on this device: (128 / (G*b)) * T(b) per step, assuming ideal data
parallel scaling (each of G identical GPUs runs its micro-batches at the measured speed, gradient accumulation makes
up the global batch, and gradient all-reduce, data loading and checkpointing cost nothing).

Peak memory: GPU `torch.cuda.max_memory_allocated` over the timed steps; CPU the glibc heap in use (mallinfo2), which
holds every CPU tensor, sampled every 2 ms and at the end of each forward pass (falls back to RSS without glibc).
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402
from transformers import BertConfig, Blip2Config, Blip2ForConditionalGeneration, CLIPConfig, PreTrainedModel  # noqa: E402

from configuration_vikdf import LLAMA_2_7B, VIKDFConfig  # noqa: E402
from modeling_vikdf import PretrainingPasses, VIKDFForConditionalGeneration  # noqa: E402
from vikdf.losses import IGNORE_INDEX  # noqa: E402
from vikdf.masking import mask_caption_tokens, tamim_pixel_masks  # noqa: E402
from vikdf.components import iq_former_config_from_bert  # noqa: E402
from vikdf.testing import tiny_llm_config, tiny_vikdf_config  # noqa: E402
from vikdf.trainers import LOSS_ONLY_INPUTS, OBJECTIVE_TABLE, count_items, enabled_objectives  # noqa: E402

ALL_ABLATIONS = ("a", "b", "c", "d", "e", "f", "g", "h")
PAPER_STEPS, PAPER_GLOBAL_BATCH = 100_000, 128
# The training arguments the objectives read (TIM's rank and world size): the benchmark is one process.
ONE_PROCESS = SimpleNamespace(process_index=0, world_size=1)


# =====================================================================================================================
# Configs
# =====================================================================================================================


def vikdf_config(args) -> VIKDFConfig:
    if args.size == "tiny":
        config = tiny_vikdf_config(args.llm_family)
        if args.llm_layers:
            text = tiny_llm_config(args.llm_family).to_dict()
            text["num_hidden_layers"] = args.llm_layers
            config = tiny_vikdf_config(args.llm_family, text_config=text)
        return config
    if args.size == "medium":
        return medium_vikdf_config(args.llm_layers or 4)
    text = {**LLAMA_2_7B, "vocab_size": 32001, "pad_token_id": 0}
    if args.llm_layers:
        text["num_hidden_layers"] = args.llm_layers
    return VIKDFConfig(text_config=text, knowledge_token_id=32000)


def medium_vikdf_config(llm_layers: int = 4) -> VIKDFConfig:
    """Width 256, 4 layers everywhere: CLIP towers at 112 px (patch 14, 65 vision tokens) and CLIP's 49,408-token
    vocabulary, an IQ-Former of 32 queries, a Llama of Llama-2's 32k vocabulary (+ `<knowledge>`)."""
    width, layers = 256, 4
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4)
    clip = CLIPConfig(
        text_config=dict(tower, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(tower, image_size=112, patch_size=14), projection_dim=width,
    )
    bert = BertConfig(**tower)
    text = {**LLAMA_2_7B, "hidden_size": width, "intermediate_size": 688, "num_hidden_layers": llm_layers,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32001, "pad_token_id": 0}
    return VIKDFConfig(
        clip_config=clip.to_dict(), qformer_config=iq_former_config_from_bert(bert, width).to_dict(),
        text_config=text, knowledge_token_id=32000, head_num_attention_heads=4, head_intermediate_size=4 * width,
    )


def blip2_config(vikdf: VIKDFConfig) -> Blip2Config:
    """BLIP-2 with VIKDF's vision tower shape (CLIP ViT-L/14 at paper size), its IQ-Former shape as the Q-Former
    (cross-attending to the vision width, as BLIP-2 does) and the same LLM; the placeholder is VIKDF's knowledge id."""
    vision = vikdf.clip_config.vision_config
    qformer = vikdf.qformer_config.to_dict()
    for key in ("encoder_hidden_size", "model_type", "transformers_version", "architectures", "dtype"):
        qformer.pop(key, None)
    return Blip2Config(
        vision_config=dict(
            hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
            image_size=vision.image_size, patch_size=vision.patch_size,
        ),
        qformer_config=qformer,
        text_config=vikdf.text_config.to_dict(),
        num_query_tokens=vikdf.num_query_tokens,
        image_token_index=vikdf.knowledge_token_id,
    )


# =====================================================================================================================
# Batches of the real format, random values
# =====================================================================================================================


@dataclass
class RowShape:
    caption: int  # caption tokens (LLM and CLIP alike)
    prompt: int  # instruction prompt tokens in the LLM rows

    @property
    def labelled_caption(self) -> int:
        """IACI targets per row: the caption and its end of sequence (`make_vikdf_batch` labels both)."""
        return self.caption + 1

    def vikdf_llm_len(self, n: int) -> int:
        return 1 + n + self.prompt + self.caption + 1

    def blip2_llm_len(self, n: int) -> int:
        return n + 1 + self.caption + 1

    @property
    def clip_len(self) -> int:
        return self.caption + 2


def _random_ids(generator: torch.Generator, shape, low: int, high: int, exclude=()) -> torch.Tensor:
    """Uniform ids in [low, high) with the `exclude`d (special) ids replaced by the smallest allowed id."""
    ids = torch.randint(low, high, shape, generator=generator)
    safe = next(i for i in range(low, high) if i not in set(exclude))
    for value in exclude:
        ids[ids == value] = safe
    return ids


def make_vikdf_batch(config: VIKDFConfig, batch: int, rows: RowShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """One micro-batch in `PretrainCollator`'s format (on the CPU): see that class for the keys."""
    g = torch.Generator().manual_seed(seed)
    vision = config.clip_config.vision_config
    size = vision.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=g)
    pixel_masks = tamim_pixel_masks(
        size, size, batch_size=batch, patch_size=config.mask_patch_size, subpatch_size=vision.patch_size,
        mask_ratio=config.mask_ratio, keep_ratio=config.mask_keep_ratio, generator=g,
    )

    text = config.clip_config.text_config
    bos, eos, pad = text.bos_token_id, text.eos_token_id, text.pad_token_id
    body = _random_ids(g, (batch, rows.caption), 0, text.vocab_size, exclude=(bos, eos, pad))
    clip_ids = torch.cat([torch.full((batch, 1), bos), body, torch.full((batch, 1), eos)], 1)
    clip_mask = torch.ones_like(clip_ids)
    masked_ids, mlm_labels = mask_caption_tokens(
        clip_ids, eos, attention_mask=clip_mask, special_token_ids={bos, eos, pad},
        mask_ratio=config.text_mask_ratio, keep_ratio=config.text_mask_keep_ratio, generator=g,
    )

    n, k = config.num_query_tokens, config.knowledge_token_id
    llm_bos, llm_eos, llm_pad = 1, 2, 0
    prompt = _random_ids(g, (batch, rows.prompt), 3, k, exclude=(k,))
    caption = _random_ids(g, (batch, rows.caption), 3, k, exclude=(k,))
    slots = torch.full((batch, n), k)
    ones = torch.ones(batch, 1, dtype=torch.long)
    iaci = torch.cat([ones * llm_bos, slots, prompt, caption, ones * llm_eos], 1)
    iaci_labels = torch.cat([torch.full((batch, 1 + n + rows.prompt), IGNORE_INDEX), caption, ones * llm_eos], 1)
    rows_out, masks, labels = [iaci], [torch.ones_like(iaci)], [iaci_labels]
    if config.use_bvif:
        iakr = torch.cat([ones * llm_bos, prompt, caption, slots], 1)
        width = iaci.shape[1]
        pad_cols = width - iakr.shape[1]
        rows_out.append(torch.cat([iakr, torch.full((batch, pad_cols), llm_pad)], 1))
        masks.append(torch.cat([torch.ones_like(iakr), torch.zeros(batch, pad_cols, dtype=torch.long)], 1))
        labels.append(torch.full((batch, width), IGNORE_INDEX))
    return {
        "pixel_values": pixel_values,
        "pixel_mask": pixel_masks.scored,
        "pixel_replaced_mask": pixel_masks.replaced,
        "clip_input_ids": clip_ids,
        "clip_attention_mask": clip_mask,
        "clip_masked_input_ids": masked_ids,
        "clip_mlm_labels": mlm_labels,
        "llm_input_ids": torch.cat(rows_out),
        "llm_attention_mask": torch.cat(masks),
        "llm_labels": torch.cat(labels),
    }


def make_blip2_batch(config: Blip2Config, batch: int, rows: RowShape, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    n, k = config.num_query_tokens, config.image_token_index
    caption = _random_ids(g, (batch, rows.caption), 3, k, exclude=(k,))
    ones = torch.ones(batch, 1, dtype=torch.long)
    input_ids = torch.cat([torch.full((batch, n), k), ones * 1, caption, ones * 2], 1)
    labels = torch.cat([torch.full((batch, n + 1), IGNORE_INDEX), caption, ones * 2], 1)
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=g).to(dtype),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
    }


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


# =====================================================================================================================
# FLOPs (see the module docstring for the formula)
# =====================================================================================================================


class FlopCount:
    """Per-component model FLOPs of one step: sum of forward FLOPs x (1 + input-grad + weight-grad passes)."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    def add(self, component: str, forward_flops: float, multiplier: int) -> None:
        self.parts[component] = self.parts.get(component, 0.0) + forward_flops * multiplier

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention_core(q_tokens: float, kv_tokens: float, width: int) -> float:
    return 4.0 * q_tokens * kv_tokens * width  # QK^T and AV


def clip_layers_forward(tower, seqs: int, tokens: int) -> float:
    """Forward FLOPs of a CLIP-style encoder (fused q,k,v,o + 2-layer MLP) over `seqs` sequences of `tokens`."""
    d, f = tower.hidden_size, tower.intermediate_size
    per_layer = _linear(tokens, d, d) * 4 + _linear(tokens, d, f) * 2 + _attention_core(tokens, tokens, d)
    return seqs * tower.num_hidden_layers * per_layer


def qformer_flops(flops: FlopCount, name: str, q, n: int, seqs: int, enc_tokens: int, enc_width: int) -> None:
    """A trained Blip2QFormerModel (query-only) over `seqs` samples of n queries against `enc_tokens` frozen states."""
    D, F = q.hidden_size, q.intermediate_size
    for layer in range(q.num_hidden_layers):
        flops.add(name, seqs * (_linear(n, D, D) * 4 + _attention_core(n, n, D) + _linear(n, D, F) * 2), 3)
        if layer % q.cross_attention_frequency == 0:
            flops.add(name, seqs * (_linear(n, D, D) * 2 + _attention_core(n, enc_tokens, D)), 3)
            flops.add(name, seqs * _linear(enc_tokens, enc_width, D) * 2, 2)  # k, v of frozen states: no input grad


def knowledge_block_flops(flops: FlopCount, name: str, config: VIKDFConfig, seqs: int, tokens: int) -> None:
    """`VIKDFKnowledgeAssistedBlock`: `tokens` frozen states of width E attend to n knowledge vectors of width D."""
    E, D, n, F = (config.clip_config.projection_dim, config.qformer_config.hidden_size, config.num_query_tokens,
                  config.head_intermediate_size)
    flops.add(name, seqs * _linear(tokens, E, E), 2)  # q map of frozen states
    flops.add(name, seqs * (_linear(n, D, E) * 2 + _attention_core(tokens, n, E) + _linear(tokens, E, E)), 3)
    flops.add(name, seqs * _linear(tokens, E, F) * 2, 3)


def llm_flops(flops: FlopCount, name: str, text, rows: int, seq: int, lm_head_tokens: int) -> None:
    """Frozen causal LLM (Llama/Qwen2/Mistral layout), forward + input gradients."""
    H, F, V = text.hidden_size, text.intermediate_size, text.vocab_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or H // heads
    q_width, kv_width = heads * head_dim, (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    per_layer = _linear(seq, H, q_width) + 2 * _linear(seq, H, kv_width) + _linear(seq, q_width, H)
    per_layer += 3 * _linear(seq, H, F)
    flops.add(name, rows * text.num_hidden_layers * per_layer, 2)
    flops.add(name, rows * text.num_hidden_layers * _attention_core(seq, seq, q_width), 3)
    flops.add(name + " LM head", _linear(lm_head_tokens, H, V), 2)


def vikdf_step_flops(config: VIKDFConfig, batch: int, rows: RowShape) -> FlopCount:
    flops = FlopCount()
    objectives = enabled_objectives(config)
    clip, q, text = config.clip_config, config.qformer_config, config.text_config
    E, D, n = clip.projection_dim, q.hidden_size, config.num_query_tokens
    L_c, S = rows.clip_len, rows.vikdf_llm_len(n)
    vision = clip.vision_config
    P = 1 + (vision.image_size // vision.patch_size) ** 2

    captions = 2 * batch if "iamtm" in objectives else batch
    flops.add("CLIP text (frozen)", clip_layers_forward(clip.text_config, captions, L_c), 1)
    flops.add("CLIP text (frozen)", captions * _linear(L_c, clip.text_config.hidden_size, E), 1)
    qformer_flops(flops, "IQ-Former on text", q, n, batch, L_c, E)
    if {"tim", "tamim", "iamtm"} & set(objectives):
        images = 2 * batch if "tamim" in objectives else batch
        patch = vision.patch_size
        flops.add("CLIP vision (frozen)", clip_layers_forward(vision, images, P), 1)
        flops.add("CLIP vision (frozen)", images * (_linear(P - 1, 3 * patch * patch, vision.hidden_size)
                                                    + _linear(P, vision.hidden_size, E)), 1)
        qformer_flops(flops, "IQ-Former on image", q, n, batch, P, E)
    if "tim" in objectives:
        image_tokens = 1 if config.tim_pooling == "first" else n
        T = config.tim_embed_dim
        flops.add("heads (TIM, TAMIM, IAMTM, IAKR)",
                  _linear(batch, D, T) + _linear(batch * image_tokens, D, T) + 2 * _linear(batch, T, batch * image_tokens), 3)
    if "tamim" in objectives:
        knowledge_block_flops(flops, "heads (TIM, TAMIM, IAMTM, IAKR)", config, batch, P)
        flops.add("heads (TIM, TAMIM, IAMTM, IAKR)", batch * _linear(P - 1, E, 3 * vision.patch_size**2), 3)
    if "iamtm" in objectives:
        knowledge_block_flops(flops, "heads (TIM, TAMIM, IAMTM, IAKR)", config, batch, L_c)
        masked_tokens = config.text_mask_ratio * (L_c - 2)  # expected; start and end of text are never masked
        flops.add("heads (TIM, TAMIM, IAMTM, IAKR)", batch * _linear(masked_tokens, E, clip.text_config.vocab_size), 3)
    llm_rows = 2 * batch if "iakr" in objectives else batch
    flops.add("language_projection", llm_rows * _linear(n, D, text.hidden_size), 3)
    llm_flops(flops, "LLM (frozen)", text, llm_rows, S, lm_head_tokens=batch * rows.labelled_caption)
    if "iakr" in objectives:
        flops.add("heads (TIM, TAMIM, IAMTM, IAKR)", batch * _linear(n, text.hidden_size, D), 3)
    return flops


def blip2_step_flops(config: Blip2Config, batch: int, rows: RowShape) -> FlopCount:
    flops = FlopCount()
    vision, q, text = config.vision_config, config.qformer_config, config.text_config
    n = config.num_query_tokens
    P = 1 + (vision.image_size // vision.patch_size) ** 2
    flops.add("vision (frozen)", clip_layers_forward(vision, batch, P), 1)
    flops.add("vision (frozen)", batch * _linear(P - 1, 3 * vision.patch_size**2, vision.hidden_size), 1)
    qformer_flops(flops, "Q-Former", q, n, batch, P, vision.hidden_size)
    flops.add("language_projection", batch * _linear(n, q.hidden_size, text.hidden_size), 3)
    llm_flops(flops, "LLM (frozen)", text, batch, rows.blip2_llm_len(n), lm_head_tokens=batch * rows.blip2_llm_len(n))
    return flops


def counted_flops(step_fn) -> float | None:
    """FLOPs torch actually executes in one step (matmuls, convolutions, SDPA; forward and backward)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    counter = FlopCounterMode(display=False)
    with counter:
        loss = step_fn()
        loss.backward()
    return float(counter.get_total_flops())


# =====================================================================================================================
# Steps
# =====================================================================================================================


def objective_sums(model, batch, objectives, separate_vision=False, clean_image_states=None, full_iamtm_logits=False,
                   separate_llm=False, full_llm_logits=False):
    """The step's per-objective sums from the model's pre-training forward, with its `PretrainingPasses` switched to
    the slower way each one replaced (none switched: what `train_pretrain.py` runs). `clean_image_states`: cached
    vision states of the clean images (B, P, E), the forward's `image_states`."""
    model.pretraining_passes = PretrainingPasses(
        one_vision_pass=not separate_vision, one_llm_pass=not separate_llm, caption_logits_only=not full_llm_logits,
        masked_token_logits_only=not full_iamtm_logits,
    )
    inputs = {key: value for key, value in batch.items() if key not in LOSS_ONLY_INPUTS}
    outputs = model(**inputs, image_states=clean_image_states)
    return {o.name: o.loss(outputs, batch, ONE_PROCESS) for o in OBJECTIVE_TABLE if o.name in objectives}


def weighted_total(losses: dict, counts: dict, weights: dict) -> torch.Tensor:
    """`VIKDFPretrainTrainer.compute_loss` without logging, gradient accumulation 1."""
    total = 0.0
    for name, value in losses.items():
        total = total + weights[name] * (value if name == "tim" else value / counts[name].clamp(min=1))
    return total


def make_optimizer(model: torch.nn.Module, impl: str, device: torch.device) -> torch.optim.Optimizer:
    """AdamW(lr 1e-4, wd 0.05) over trainable parameters, no decay on biases and norms (as the Trainer).

    impl: fused (the Trainer's default `adamw_torch_fused`), foreach, or forloop.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "forloop": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=1e-4, **kwargs)


def time_training(loss_fn, model, optimizer, device, steps: int, warmup: int) -> dict:
    """`steps` timed steps after `warmup`: per-step forward / backward / optimizer seconds (device synchronised at
    each boundary), losses, and the peak memory over the timed steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    memory = common.PeakMemory(device)

    def one_step():
        common.synchronize(device)
        t0 = time.perf_counter()
        loss = loss_fn()
        common.synchronize(device)
        t1 = time.perf_counter()
        memory.poll()  # CPU: activations peak here
        loss.backward()
        common.synchronize(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        common.synchronize(device)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, float(loss.detach())

    for _ in range(warmup):
        one_step()
    phases = []
    with memory:
        for _ in range(steps):
            phases.append(one_step())
    return {"phases": phases, "peak_memory_gib": memory.peak_gib}


def summarize(rounds: list[dict]) -> dict:
    """One row from one or more rounds of `time_training`: medians over all timed steps, the largest peak."""
    errors = [r["error"] for r in rounds if "error" in r]
    if errors:
        return {"error": errors[0]}
    phases = [p for r in rounds for p in r["phases"]]
    totals = [sum(p[:3]) for p in phases]
    return {
        "step_s": statistics.median(totals),
        "step_mean_s": statistics.fmean(totals),
        "step_std_s": statistics.pstdev(totals),
        "step_min_s": min(totals),
        "round_median_s": [statistics.median(sum(p[:3]) for p in r["phases"]) for r in rounds],
        "forward_s": statistics.median(p[0] for p in phases),
        "backward_s": statistics.median(p[1] for p in phases),
        "optimizer_s": statistics.median(p[2] for p in phases),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in rounds),
        "loss": phases[-1][3],
        "finite": all(math.isfinite(p[3]) for p in phases),
        "timed_steps": len(phases),
    }


# =====================================================================================================================
# Runs
# =====================================================================================================================


class VIKDFBench:
    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.config = vikdf_config(args)
        t0 = time.perf_counter()
        self.model = common.build_random_model(
            VIKDFForConditionalGeneration, copy.deepcopy(self.config), device, dtype, args.attn_implementation
        )
        self.build_s = time.perf_counter() - t0
        self.model.set_trainable_stage("pretrain")
        self.model.train()
        self.objectives = enabled_objectives(self.model.config)
        self.weights = {o.name: getattr(self.model.config, o.weight) for o in OBJECTIVE_TABLE}
        self.rows = RowShape(args.caption_tokens, args.prompt_tokens)
        self.batches: dict[int, dict] = {}

    def batch(self, size: int) -> dict:
        if size not in self.batches:
            self.batches = {}  # keep one micro-batch on the device at a time
            self.batches[size] = to_device(make_vikdf_batch(self.model.config, size, self.rows, self.args.seed), self.device)
        return self.batches[size]

    def loss_fn(self, size: int, **variant):
        batch = self.batch(size)
        counts = count_items(batch, self.model.config.num_query_tokens)
        counts = {key: value.to(self.device) for key, value in counts.items()}
        cache = variant.pop("cache", None)

        def run():
            with common.autocast_context(self.device, self.dtype):
                if cache is not None:
                    variant["clean_image_states"] = cache.to(self.device, non_blocking=True)
                return weighted_total(objective_sums(self.model, batch, self.objectives, **variant), counts, self.weights)

        return run

    def clean_image_cache(self, size: int) -> torch.Tensor:
        """Projected vision states of the clean images, held in (pinned) host memory as a feature cache would."""
        with torch.no_grad(), common.autocast_context(self.device, self.dtype):
            states = self.model.encode_image(self.batch(size)["pixel_values"])
        states = states.detach().to("cpu")
        return states.pin_memory() if self.device.type == "cuda" else states

    def measure_once(self, size: int, optimizer_impl: str | None = None, **variant) -> dict:
        optimizer = make_optimizer(self.model, optimizer_impl or self.args.optimizer, self.device)
        try:
            return time_training(self.loss_fn(size, **variant), self.model, optimizer, self.device,
                                 self.args.steps, self.args.warmup)
        finally:
            self.model.zero_grad(set_to_none=True)
            del optimizer
            common.free_memory(self.device)

    def check_variants(self, size: int) -> dict:
        """Losses of each variant vs the trainer's code on the same batch, dropout off (max relative difference)."""
        self.model.eval()
        results = {}
        try:
            with torch.no_grad():
                reference = self.loss_fn(size)()
                variants = {
                    "(a) two vision passes": {"separate_vision": True},
                    "(b) two LLM calls": {"separate_llm": True},
                    "(f) cached clean-image states": {"cache": self.clean_image_cache(size)},
                    "(g) LM head on every position of every row": {"full_llm_logits": True},
                    "(h) IAMTM head on every caption token": {"full_iamtm_logits": True},
                }
                for name, variant in variants.items():
                    value = self.loss_fn(size, **variant)()
                    results[name] = abs(float(value) - float(reference)) / max(abs(float(reference)), 1e-12)
        finally:
            self.model.train()
        return results

    def close(self):
        self.model = None
        self.batches = {}
        common.free_memory(self.device)


class Blip2Bench:
    def __init__(self, args, device, dtype, vikdf_cfg: VIKDFConfig):
        self.args, self.device, self.dtype = args, device, dtype
        self.config = blip2_config(vikdf_cfg)
        t0 = time.perf_counter()
        self.model = common.build_random_model(Blip2ForConditionalGeneration, copy.deepcopy(self.config), device,
                                               dtype, args.attn_implementation)
        self.build_s = time.perf_counter() - t0
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad = name.split(".")[0] in ("query_tokens", "qformer", "language_projection")
        self.model.train()
        self.rows = RowShape(args.caption_tokens, args.prompt_tokens)

    def loss_fn(self, size: int):
        batch = to_device(make_blip2_batch(self.model.config, size, self.rows, self.dtype, self.args.seed), self.device)

        def run():
            with common.autocast_context(self.device, self.dtype):
                return self.model(**batch).loss

        return run

    def measure_once(self, size: int) -> dict:
        optimizer = make_optimizer(self.model, self.args.optimizer, self.device)
        try:
            return time_training(self.loss_fn(size), self.model, optimizer, self.device, self.args.steps,
                                 self.args.warmup)
        finally:
            self.model.zero_grad(set_to_none=True)
            del optimizer
            common.free_memory(self.device)

    def close(self):
        self.model = None
        common.free_memory(self.device)


def guarded(fn, device):
    """Run a measurement; an out-of-memory error becomes {"error": "OOM"} instead of ending the run."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - a benchmark row must not end the run
        common.free_memory(device)
        if common.is_oom(error):
            return {"error": "OOM"}
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}


def interleaved(measurements: list, rounds: int, device) -> list[dict]:
    """Run the measurement functions round-robin `rounds` times (A B C A B C ...) so that a slow phase of a shared
    machine hits every variant alike; one summary per function."""
    raw = [[] for _ in measurements]
    for _ in range(rounds):
        for index, measure in enumerate(measurements):
            if raw[index] and "error" in raw[index][-1]:
                continue
            raw[index].append(guarded(measure, device))
    return [summarize(r) for r in raw]


def with_rates(result: dict, batch: int, llm_tokens: int, flops: float, peak_tflops: float | None) -> dict:
    if "error" in result:
        return result
    step = result["step_s"]
    result.update(
        micro_batch=batch,
        samples_per_s=batch / step,
        llm_tokens_per_s=llm_tokens / step,
        model_tflop_per_step=flops / 1e12,
        achieved_tflops=flops / step / 1e12,
        mfu=(flops / step / (peak_tflops * 1e12)) if peak_tflops else None,
    )
    return result


def _switch(enter, leave, measure):
    """A measurement run with a model setting switched on before and off after."""
    def run():
        enter()
        try:
            return measure()
        finally:
            leave()
    return run


def run_ablations(bench: VIKDFBench, size: int, which: list[str], gc_flag: bool, rounds: int) -> list[dict]:
    """Before/after rows. The variants of one ablation are measured interleaved, `rounds` times each, on the same
    model and micro-batch; (a, b, d, e, f) use the main rows' checkpointing setting."""
    device, model, rows = bench.device, bench.model, []
    gc_on = model.activation_checkpointing_enable if gc_flag else (lambda: None)
    gc_off = model.activation_checkpointing_disable if gc_flag else (lambda: None)

    def measure(**kwargs):
        return _switch(gc_on, gc_off, lambda: bench.measure_once(size, **kwargs))

    def add(letter, what, before_label, after_label, before, after, **extra):
        row = {"ablation": letter, "what": what, "before": before_label, "after": after_label,
               "before_result": before, "after_result": after, **extra}
        if "error" not in before and "error" not in after:
            row["speedup"] = before["step_s"] / after["step_s"]
            row["memory_ratio"] = after["peak_memory_gib"] / before["peak_memory_gib"] if before["peak_memory_gib"] else None
            row["round_speedups"] = [b / a for b, a in zip(before["round_median_s"], after["round_median_s"])]
        rows.append(row)
        print(f"  ({letter}) {what}: {before_label} {common.fmt(before.get('step_s'), 4)} s -> {after_label} "
              f"{common.fmt(after.get('step_s'), 4)} s, speed-up {common.fmt(row.get('speedup'), 3)}, memory "
              f"{common.fmt(row.get('memory_ratio'), 3)} {after.get('error', '')}", flush=True)

    if "a" in which:
        before, after = interleaved([measure(separate_vision=True), measure()], rounds, device)
        add("a", "frozen vision tower, clean + masked images", "two passes", "one batched pass", before, after)
    if "b" in which:
        before, after = interleaved([measure(separate_llm=True), measure()], rounds, device)
        add("b", "IACI + IAKR rows through the LLM", "two LLM calls", "one LLM call", before, after)
    if "c" in which:
        # The model's own switch (what the Trainer's --activation_checkpointing calls) checkpoints the frozen LLM only;
        # transformers' generic one, which it overrides, checkpoints every layer, the IQ-Former's included.
        llm_gc = _switch(model.activation_checkpointing_enable, model.activation_checkpointing_disable,
                         lambda: bench.measure_once(size))
        all_gc = _switch(lambda: PreTrainedModel.activation_checkpointing_enable(model),
                         model.activation_checkpointing_disable, lambda: bench.measure_once(size))
        off, llm, whole = interleaved([lambda: bench.measure_once(size), llm_gc, all_gc], rounds, device)
        add("c", "gradient checkpointing (memory vs time)", "off", "LLM only (the Trainer's flag)", off, llm)
        add("c", "gradient checkpointing (memory vs time)", "off", "every layer (generic)", off, whole)
    if "d" in which:
        loop, foreach, fused = interleaved(
            [measure(optimizer_impl="forloop"), measure(optimizer_impl="foreach"), measure(optimizer_impl="fused")],
            rounds, device)
        add("d", "AdamW implementation", "for-loop", "foreach", loop, foreach)
        add("d", "AdamW implementation", "foreach", "fused", foreach, fused)
    if "e" in which:
        original = model.iq_former
        compiled_module, compile_s, error = None, None, None
        try:
            compiled_module = torch.compile(original)
            model.iq_former = compiled_module
            gc_on()
            t0 = time.perf_counter()
            bench.loss_fn(size)().backward()  # compile one training step's graphs outside the timed steps
            common.synchronize(device)
            compile_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - compile is optional
            error = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            traceback.print_exc()
        finally:
            gc_off()
            model.zero_grad(set_to_none=True)
            model.iq_former = original
        if error is None:
            def swap_in():
                model.iq_former = compiled_module
            def swap_out():
                model.iq_former = original
            eager, compiled = interleaved([measure(), _switch(swap_in, swap_out, measure())], rounds, device)
        else:
            eager, compiled = {"error": error}, {"error": error}
        torch._dynamo.reset()
        add("e", "torch.compile of the IQ-Former", "eager", "compiled", eager, compiled, compile_s=compile_s)
    if "f" in which:
        cache = bench.clean_image_cache(size)
        before, after = interleaved([measure(), measure(cache=cache)], rounds, device)
        add("f", "clean-image CLIP features", "vision forward on clean + masked", "cached clean states (H2D copy)",
            before, after)
    if "g" in which:
        before, after = interleaved([measure(full_llm_logits=True), measure()], rounds, device)
        add("g", "LM-head logits", "all rows, all positions (the previous code)", "IACI caption positions (the trainer)",
            before, after)
    if "h" in which:
        before, after = interleaved([measure(full_iamtm_logits=True), measure()], rounds, device)
        add("h", "IAMTM vocabulary logits", "every caption token", "masked tokens only (the trainer)", before, after)
    return rows


def projection_rows(results: list[dict], gpus: int, steps: int, global_batch: int) -> list[dict]:
    rows = []
    for r in results:
        if "error" in r:
            continue
        per_gpu = global_batch / gpus
        accumulation = per_gpu / r["micro_batch"]
        step_s = accumulation * r["step_s"]
        rows.append({"model": r["model"], "micro_batch": r["micro_batch"], "accumulation": accumulation,
                     "global_step_s": step_s, "hours": steps * step_s / 3600, "days": steps * step_s / 86400})
    return rows


# =====================================================================================================================
# Report
# =====================================================================================================================


def size_label(args) -> str:
    label = args.size
    if args.size == "tiny" and args.llm_family != "llama":
        label += f"-{args.llm_family}"
    if args.llm_layers:
        label += f"-llm{args.llm_layers}L"
    return label


def flop_table(vikdf: FlopCount, blip2: FlopCount | None) -> str:
    rows = [[name, common.fmt(value / 1e9, 3), f"{100 * value / vikdf.total:.1f} %"] for name, value in vikdf.parts.items()]
    rows.append(["**VIKDF total**", f"**{common.fmt(vikdf.total / 1e9, 3)}**", "100 %"])
    if blip2 is not None:
        rows += [[f"BLIP-2: {name}", common.fmt(value / 1e9, 3), f"{100 * value / blip2.total:.1f} %"]
                 for name, value in blip2.parts.items()]
        rows.append(["**BLIP-2 total**", f"**{common.fmt(blip2.total / 1e9, 3)}**", "100 %"])
    return common.markdown_table(["component (one step, fwd + bwd as in the docstring)", "GFLOP", "share"], rows)


def render(args, info, meta, results, ablations, projections, checks, flops_b1) -> str:
    label = "CPU, tiny shapes: NOT representative of GPU" if meta["device_type"] == "cpu" and args.size == "tiny" else \
        ("CPU: not representative of GPU" if meta["device_type"] == "cpu" else meta["device"])
    out = [f"# VIKDF pre-training step — {meta['device']} — size {size_label(args)} ({label})", ""]
    out += common.machine_lines(info)
    out += [
        f"- dtype: {meta['dtype']} (autocast; IQ-Former/Q-Former fp32 weights), attention: {args.attn_implementation}, "
        f"optimizer: AdamW {args.optimizer}, grad clip 1.0, gradient checkpointing (main rows): "
        f"{'as --activation_checkpointing (VIKDF: the LLM; BLIP-2: every layer)' if args.gradient_checkpointing else 'off'}",
        f"- rows: caption {args.caption_tokens} tokens, prompt {args.prompt_tokens}; VIKDF LLM rows 2B x "
        f"{meta['vikdf_llm_len']} tokens, CLIP captions {meta['clip_len']} tokens; BLIP-2 LLM rows B x "
        f"{meta['blip2_llm_len']} tokens",
        f"- steps: per row {meta['rounds']} interleaved round(s) of {args.warmup} warm-up + {args.steps} timed steps; "
        f"median over all timed steps reported; model build "
        f"{common.fmt(meta['vikdf_build_s'])} s (VIKDF)",
        f"- parameters: VIKDF {meta['vikdf_params'] / 1e6:,.1f} M ({meta['vikdf_trainable'] / 1e6:,.1f} M trained); "
        f"BLIP-2 {meta.get('blip2_params', 0) / 1e6:,.1f} M ({meta.get('blip2_trainable', 0) / 1e6:,.1f} M trained)",
        f"- peak FLOP/s for MFU: {meta['peak_source']}",
        f"- memory: {meta['memory_method']}",
        "",
        "## Step time per micro-batch",
        "",
    ]
    headers = ["model", "micro-batch", "samples/s", "LLM tokens/s", "step ms (fwd/bwd/opt)", "peak GiB",
               "TFLOP/step", "TFLOP/s", "MFU"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["micro_batch"], r["error"], "", "", "", "", "", ""])
            continue
        rows.append([
            r["model"], r["micro_batch"], common.fmt(r["samples_per_s"], 2), common.fmt(r["llm_tokens_per_s"], 0),
            f"{r['step_s'] * 1e3:,.1f} ({r['forward_s'] * 1e3:,.1f}/{r['backward_s'] * 1e3:,.1f}/{r['optimizer_s'] * 1e3:,.1f})",
            common.fmt(r["peak_memory_gib"], 3), common.fmt(r["model_tflop_per_step"], 4),
            common.fmt(r["achieved_tflops"], 3), f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a",
        ])
    out.append(common.markdown_table(headers, rows))
    best = {}
    for r in results:
        if "error" not in r and (r["model"] not in best or r["samples_per_s"] > best[r["model"]]["samples_per_s"]):
            best[r["model"]] = r
    if best:
        out += ["", "Best micro-batch: " + "; ".join(
            f"{m} {r['micro_batch']} ({common.fmt(r['samples_per_s'])} samples/s"
            + (f", MFU {100 * r['mfu']:.1f} %" if r["mfu"] is not None else "") + ")" for m, r in best.items())]
        if "VIKDF" in best and "BLIP-2" in best:
            out.append(f"VIKDF / BLIP-2 samples/s at the best micro-batch: "
                       f"{best['VIKDF']['samples_per_s'] / best['BLIP-2']['samples_per_s']:.3f}")

    if ablations:
        out += ["", f"## Ablations (micro-batch {meta['ablation_micro_batch']}; speed-up = before / after step time; "
                "memory = after / before peak)", ""]
        rows = []
        for a in ablations:
            b, f = a["before_result"], a["after_result"]
            rows.append([
                f"({a['ablation']}) {a['what']}", a["before"], a["after"],
                b.get("error") or f"{b['step_s'] * 1e3:,.1f}", f.get("error") or f"{f['step_s'] * 1e3:,.1f}",
                common.fmt(a.get("speedup"), 3),
                "" if "error" in b else common.fmt(b["peak_memory_gib"], 3),
                "" if "error" in f else common.fmt(f["peak_memory_gib"], 3),
                common.fmt(a.get("memory_ratio"), 3),
            ])
        out.append(common.markdown_table(
            ["ablation", "before", "after", "before ms", "after ms", "speed-up", "before GiB", "after GiB", "memory"],
            rows, align="lllrrrrrr"))
        compiled = [a for a in ablations if a["ablation"] == "e" and a.get("compile_s")]
        if compiled:
            out.append(f"\n(e) compile time (first call, not in the timed steps): {compiled[0]['compile_s']:.1f} s")
        if meta["device_type"] == "cpu":
            out.append("\nOn CPU the optimizer-step share and the cost of extra kernel launches differ from a GPU's, and "
                       "peak memory is the whole process heap (weights, optimizer state and Python objects included), "
                       "so memory ratios are diluted compared with GPU tensor memory.")

    out += ["", f"## FLOPs per step at micro-batch {meta['flops_micro_batch']} (formula in the script's docstring)", ""]
    out.append(flop_table(flops_b1["vikdf"], flops_b1.get("blip2")))
    if checks.get("flop_counter"):
        out += ["", "Formula vs `torch.utils.flop_counter.FlopCounterMode` (executed matmul/conv/SDPA FLOPs of one "
                "step):"]
        for model, (formula, counted) in checks["flop_counter"].items():
            out.append(f"- {model}: model FLOPs {formula / 1e9:,.4f} GFLOP; counted {counted / 1e9:,.4f} GFLOP; "
                       f"formula / counted {formula / counted:.3f}"
                       if counted else f"- {model}: not counted")
        out.append("  (FlopCounterMode counts SDPA's backward as 2.5x its forward, the formula 2x; rotary-embedding "
                   "matmuls are counted there, not here.)")
    if checks.get("variants"):
        out += ["", "Variant losses vs the model's default passes (eval mode, same batch; relative difference):"]
        out += [f"- {name}: {value:.2e}" if isinstance(value, float) else f"- {name}: {value}"
                for name, value in checks["variants"].items()]

    if projections:
        out += ["", f"## Projected wall time of 100k steps x global batch 128 on {args.gpus} x {meta['device']}", "",
                "Ideal data-parallel scaling assumed: each GPU runs its share at the measured step time, gradient "
                "accumulation makes up the global batch, all-reduce / data loading / checkpoint saving cost nothing. "
                "Only meaningful when this run was on the target GPU.", ""]
        rows = [[p["model"], p["micro_batch"], common.fmt(p["accumulation"], 1), common.fmt(p["global_step_s"], 3),
                 common.fmt(p["hours"], 1), common.fmt(p["days"], 2)] for p in projections]
        out.append(common.markdown_table(["model", "micro-batch", "accum. steps", "s / global step", "hours", "days"], rows))
    out.append("")
    return "\n".join(out)


def analytic_projection(args) -> str:
    """FLOPs per sample at this size and the wall time they imply at assumed MFUs (no model is built)."""
    config = vikdf_config(args)
    rows_shape = RowShape(args.caption_tokens, args.prompt_tokens)
    batch = 32
    vikdf = vikdf_step_flops(config, batch, rows_shape)
    blip2 = blip2_step_flops(blip2_config(config), batch, rows_shape)
    per_sample = {"VIKDF": vikdf.total / batch, "BLIP-2": blip2.total / batch}
    lines = [f"# FLOPs of one step at micro-batch {batch}, size {size_label(args)} (no model built)", "",
             flop_table(vikdf, blip2), ""]
    lines.append(f"Per sample: VIKDF {per_sample['VIKDF'] / 1e12:.3f} TFLOP, BLIP-2 {per_sample['BLIP-2'] / 1e12:.3f} TFLOP. "
                 f"The schedule is {PAPER_STEPS:,} x {PAPER_GLOBAL_BATCH} = {PAPER_STEPS * PAPER_GLOBAL_BATCH:,} samples.")
    lines += ["", "Wall time = samples x FLOPs/sample / (GPUs x peak x MFU), ideal data-parallel scaling:", ""]
    table = []
    for name, gpus, peak in (("1 x H200 (989.4 TFLOP/s bf16)", 1, 989.4), ("4 x RTX 4090 (165.2 TFLOP/s bf16)", 4, 165.2)):
        for mfu in (0.3, 0.4, 0.5):
            hours = PAPER_STEPS * PAPER_GLOBAL_BATCH * per_sample["VIKDF"] / (gpus * peak * 1e12 * mfu) / 3600
            table.append([name, f"{int(mfu * 100)} %", common.fmt(hours, 1), common.fmt(hours / 24, 2)])
    lines.append(common.markdown_table(["hardware", "assumed MFU", "hours", "days"], table))
    return "\n".join(lines) + "\n"


# =====================================================================================================================
# Main
# =====================================================================================================================


def parse_args(argv=None):
    p = common.argument_parser(__doc__, llm_layers_help="cut the LLM to this many layers (e.g. 2 on CPU)",
                               sizes=("tiny", "medium", "paper"))
    p.add_argument("--micro_batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="checkpointing in the main rows, as the Trainer's --activation_checkpointing switches it on")
    p.add_argument("--caption_tokens", type=int, default=20, help="caption length in tokens (LLM and CLIP)")
    p.add_argument("--prompt_tokens", type=int, default=12, help="instruction prompt length in the LLM rows")
    p.add_argument("--optimizer", choices=("fused", "foreach", "forloop"), default="fused",
                   help="AdamW implementation of the main rows (fused = the Trainer's default adamw_torch_fused)")
    p.add_argument("--no_blip2", action="store_true", help="skip the BLIP-2 reference")
    p.add_argument("--ablations", nargs="*", default=["a", "b", "c", "d", "f", "g", "h"], choices=ALL_ABLATIONS,
                   help="which ablations to time (e = torch.compile, slow to compile on CPU; g, h = proposed model "
                        "changes)")
    p.add_argument("--ablation_micro_batch", type=int, default=None, help="default: the largest micro-batch")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak FLOP/s for MFU (default: GPU table)")
    p.add_argument("--projection", action="store_true", help="project the paper's 100k x 128 schedule")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for --projection (ideal data parallel)")
    p.add_argument("--flops_only", action="store_true", help="print FLOPs per sample and analytic wall times; no run")
    p.add_argument("--no_checks", action="store_true", help="skip the variant-loss and FlopCounterMode checks")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of --steps per row (default 3 on CPU, 2 on GPU); medians over all steps")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.flops_only:
        text = analytic_projection(args)
        print(text)
        return text
    torch.manual_seed(args.seed)
    device = common.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = common.resolve_dtype(args.dtype, device)
    info = common.machine_info(device)
    peak, peak_source = (args.peak_tflops, f"--peak_tflops {args.peak_tflops}") if args.peak_tflops else \
        common.default_peak_tflops(device, dtype)
    sizes = sorted(set(args.micro_batch_sizes))
    rounds = args.rounds or (3 if device.type == "cpu" else 2)
    ablation_mb = args.ablation_micro_batch or max(sizes)
    rows_shape = RowShape(args.caption_tokens, args.prompt_tokens)
    print(f"device {info['device']}, dtype {common.dtype_name(dtype)}, size {size_label(args)}, peak {peak_source}", flush=True)

    results, ablations, checks = [], [], {}
    bench = VIKDFBench(args, device, dtype)
    config = bench.model.config
    n = config.num_query_tokens
    meta = {
        "device": info["device"], "device_type": device.type, "dtype": common.dtype_name(dtype),
        "peak_tflops": peak, "peak_source": peak_source, "memory_method": common.PeakMemory(device).method,
        "vikdf_llm_len": rows_shape.vikdf_llm_len(n), "clip_len": rows_shape.clip_len,
        "blip2_llm_len": rows_shape.blip2_llm_len(n), "vikdf_build_s": bench.build_s,
        "vikdf_params": common.count_parameters(bench.model),
        "vikdf_trainable": common.count_parameters(bench.model, trainable=True),
        "ablation_micro_batch": ablation_mb, "flops_micro_batch": sizes[0], "rounds": rounds,
    }
    print(f"VIKDF built in {bench.build_s:.1f} s: {meta['vikdf_params'] / 1e6:.1f} M parameters", flush=True)
    blip2_cfg = blip2_config(vikdf_config(args))
    flops_first = {"vikdf": vikdf_step_flops(config, sizes[0], rows_shape)}
    if not args.no_blip2:
        flops_first["blip2"] = blip2_step_flops(blip2_cfg, sizes[0], rows_shape)

    if not args.no_checks:
        checks["variants"] = guarded(lambda: bench.check_variants(min(2, ablation_mb)), device)
        counted = guarded(lambda: counted_flops(bench.loss_fn(sizes[0])), device)
        bench.model.zero_grad(set_to_none=True)
        checks["flop_counter"] = {"VIKDF": (flops_first["vikdf"].total,
                                            counted if isinstance(counted, float) else None)}
        print(f"checks: {checks}", flush=True)

    def main_rows(model_name, bench_obj, flop_fn, llm_tokens):
        if args.gradient_checkpointing:
            bench_obj.model.activation_checkpointing_enable()
        try:
            summaries = interleaved([lambda s=size: bench_obj.measure_once(s) for size in sizes], rounds, device)
        finally:
            if args.gradient_checkpointing:
                bench_obj.model.activation_checkpointing_disable()
        for size, result in zip(sizes, summaries):
            result = with_rates(result, size, llm_tokens(size), flop_fn(size).total, peak)
            result.update(model=model_name, micro_batch=size)
            results.append(result)
            print(f"{model_name} micro-batch {size}: step {common.fmt(result.get('step_s'), 4)} s "
                  f"{result.get('error', '')}", flush=True)

    main_rows("VIKDF", bench, lambda size: vikdf_step_flops(config, size, rows_shape),
              lambda size: 2 * size * rows_shape.vikdf_llm_len(n))
    if args.ablations:
        print(f"ablations at micro-batch {ablation_mb}: {args.ablations}", flush=True)
        ablations = run_ablations(bench, ablation_mb, args.ablations, args.gradient_checkpointing, rounds)
    bench.close()
    bench = None

    if not args.no_blip2:
        blip = Blip2Bench(args, device, dtype, vikdf_config(args))
        meta["blip2_params"] = common.count_parameters(blip.model)
        meta["blip2_trainable"] = common.count_parameters(blip.model, trainable=True)
        meta["blip2_build_s"] = blip.build_s
        if not args.no_checks:
            counted = guarded(lambda: counted_flops(blip.loss_fn(sizes[0])), device)
            blip.model.zero_grad(set_to_none=True)
            checks.setdefault("flop_counter", {})["BLIP-2"] = (
                flops_first["blip2"].total, counted if isinstance(counted, float) else None)
        main_rows("BLIP-2", blip, lambda size: blip2_step_flops(blip.model.config, size, rows_shape),
                  lambda size: size * rows_shape.blip2_llm_len(n))
        blip.close()
        blip = None

    projections = projection_rows(results, args.gpus, PAPER_STEPS, PAPER_GLOBAL_BATCH) if args.projection else []
    markdown = render(args, info, meta, results, ablations, projections, checks, flops_first)
    print(markdown)
    stem = f"pretrain_step_{common.device_slug(device)}_{size_label(args)}" + (f"_{args.tag}" if args.tag else "")
    payload = {"machine": info, "meta": meta, "args": vars(args), "results": results, "ablations": ablations,
               "projection": projections, "checks": checks,
               "flops_breakdown": {k: v.parts for k, v in flops_first.items()}}
    md_path, json_path = common.write_results(stem, markdown, payload, args.output_dir)
    print(f"wrote {md_path} and {json_path}")
    return payload


if __name__ == "__main__":
    main()
