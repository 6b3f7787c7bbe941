"""VIKDF: an IQ-Former distils visual implicit knowledge from text through frozen CLIP towers, and a frozen causal
LLM reads it as soft prompts (paper §3).

Hub remote code: this file travels with every checkpoint, so it imports only torch, transformers and
`configuration_vikdf`.

Shapes in comments use B = batch, L = text length, P = 1 + image patches, n = queries, D = IQ-Former width,
E = CLIP projection width, H = LLM width.
"""

import copy
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    Blip2QFormerModel,
    CLIPTextModel,
    CLIPVisionModel,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.loss.loss_utils import fixed_cross_entropy
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput
from transformers.utils import logging

try:
    from .configuration_vikdf import VIKDFConfig
    from .processing_vikdf import IGNORE_INDEX
except ImportError:
    from configuration_vikdf import VIKDFConfig
    from processing_vikdf import IGNORE_INDEX

logger = logging.get_logger(__name__)

# The pre-training objectives (§3.2–3.3) in the order of eq. 5 + eq. 9: the config switch of Table 3 that turns each off
# (IACI always trains) and the top-level parts only it uses. `vikdf.training.trainers.OBJECTIVE_TABLE` gives each its
# loss, weight and item count; the trainable parts below are derived from this table.
OBJECTIVE_PARTS = {
    "tim": ("use_tim", ("tim_text_projection", "tim_image_projection", "logit_scale")),
    "tamim": ("use_tamim", ("tamim_block", "tamim_decoder")),
    "iamtm": ("use_iamtm", ("iamtm_block", "iamtm_head")),
    "iaci": (None, ()),
    "iakr": ("use_bvif", ("iakr_head",)),
}


def enabled_objectives(config: VIKDFConfig) -> tuple[str, ...]:
    """The objectives a config trains: Table 3's switches remove TIM, TAMIM, IAMTM or IAKR (−BVIF)."""
    return tuple(name for name, (switch, _) in OBJECTIVE_PARTS.items() if switch is None or getattr(config, switch))


OBJECTIVE_HEADS = tuple(head for _, heads in OBJECTIVE_PARTS.values() for head in heads)
# Which top-level parts train in each stage (paper §3.2–3.4). Everything else (CLIP towers, LLM) stays frozen.
DIALOGUE_TRAINABLE = ("query_tokens", "iq_former", "language_projection")
PRETRAIN_TRAINABLE = (*DIALOGUE_TRAINABLE, *OBJECTIVE_HEADS)
# Beyond the paper's recipe: dialogue fine-tuning of the projection alone, keeping `K` as pre-training left it.
TRAINABLE_BY_STAGE = {"pretrain": PRETRAIN_TRAINABLE, "dialogue": DIALOGUE_TRAINABLE,
                      "dialogue_projection": ("language_projection",), "frozen": ()}
# Parts only the pre-training objectives use; zero-resource inference needs none of them.
PRETRAINING_ONLY = ("vision_encoder", "visual_projection", *OBJECTIVE_HEADS)
# What a bitsandbytes `quantization_config` leaves in full precision: everything but the frozen LLM's layers. The
# LLM's output head (`lm_head`, by suffix) stays too, as transformers leaves it for a causal LM of its own: it reads
# every token's logits, and rounding it costs the most quality for the least memory.
NOT_QUANTISED = ("text_encoder", "text_projection", "iq_former", "language_projection", *PRETRAINING_ONLY, "lm_head")


def llm_only_quantization(quantization_config):
    """`quantization_config` (bitsandbytes, object or dict) made to skip every part but the LLM's layers."""
    from transformers import BitsAndBytesConfig

    if isinstance(quantization_config, dict):
        quantization_config = BitsAndBytesConfig.from_dict(quantization_config)
    if not isinstance(quantization_config, BitsAndBytesConfig):
        raise ValueError(
            f"VIKDF quantises its frozen LLM with bitsandbytes only; got {type(quantization_config).__name__}. "
            "Pass BitsAndBytesConfig(load_in_4bit=True) or BitsAndBytesConfig(load_in_8bit=True)."
        )
    skipped = quantization_config.llm_int8_skip_modules or []
    quantization_config.llm_int8_skip_modules = sorted(set(skipped) | set(NOT_QUANTISED))
    return quantization_config


# Decoding of the released code, the generation config every VIKDF checkpoint carries. No sampling
# matters: Llama-2-chat's own generation config samples (temperature 0.6, top-p 0.9).
PAPER_GENERATION = {"num_beams": 3, "no_repeat_ngram_size": 3, "max_new_tokens": 32, "do_sample": False}


def paper_generation_config(base: GenerationConfig | None = None) -> GenerationConfig:
    """`base` (e.g. the LLM's, for its bos/eos/pad ids) with the paper's decoding and no sampling settings."""
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.update(**PAPER_GENERATION, temperature=None, top_p=None, top_k=None)
    config._from_model_config = False  # a setting of its own, saved as generation_config.json
    return config


def damaged_weight_file(folder) -> tuple[str, Exception] | None:
    """The first `*.safetensors` file of a local `folder` whose header cannot be read, with the error (None when every
    one can, or `folder` is not a local folder): safetensors' own error names no file."""
    from safetensors import safe_open  # a dependency of transformers; only needed on this error path

    if folder is None or not os.path.isdir(folder):
        return None
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt"):
                    pass
            except Exception as error:  # SafetensorError, or the file's own OSError
                return os.path.join(folder, name), error
    return None


def _next_token_loss(
    logits: torch.Tensor, labels: torch.LongTensor, positions: torch.BoolTensor, num_items_in_batch=None
) -> torch.Tensor:
    """transformers' causal-LM loss from the logits (M, V) of `positions` (B, S) only: position t predicts
    `labels[t + 1]`; a sum over `num_items_in_batch` when given (the Trainer's accumulation), else a mean."""
    targets = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:][positions]
    return fixed_cross_entropy(logits.float(), targets, num_items_in_batch)


def next_token_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, S) True where the next token is labelled (not transformers' ignore index -100): the only positions whose
    logits a next-token loss reads."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def apply_pixel_mask(pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked image I' of eq. 3: normalised `pixel_values` (`(C, H, W)` or `(B, C, H, W)`) with the pixels where
    `mask` (`(H, W)` or `(B, H, W)`; the *replaced* set) is True set to 0, on every channel. Returns a new tensor."""
    return pixel_values.masked_fill(mask.to(pixel_values.device).unsqueeze(-3), 0.0)


@dataclass
class PretrainingPasses:
    """How the pre-training forward batches its work. The defaults are what training runs; each switch restores the
    slower way it replaced, with the same losses, for benchmarks/bench_pretrain_step.py to time against it."""

    one_vision_pass: bool = True  # clean and masked images through the frozen vision tower in one call, not two
    one_llm_pass: bool = True  # IACI rows and IAKR rows through the LLM in one call, not two
    caption_logits_only: bool = True  # the LM head on the IACI rows' caption positions, not on every position
    masked_token_logits_only: bool = True  # the IAMTM vocabulary head on the masked tokens, not on every token


@dataclass
class VIKDFPretrainingOutput(ModelOutput):
    """What the pre-training objectives are computed from (`vikdf.training.trainers.OBJECTIVE_TABLE`), every
    objective's inputs in one output as FLAVA's pre-training model returns them. One forward builds them all, so that
    DDP and DeepSpeed see every trained part used. An objective the config turns off leaves its fields None.

    text_knowledge: `K_T` (B, n, D), the LLM's soft prompt and IAKR's target (eq. 8).
    tim_text_embeddings, tim_image_embeddings, logit_scale: eq. 2's embeddings (`tim_embeddings`) and log(1/τ) (1,).
    tamim_reconstruction: the pixels (B, 3, H, W) rebuilt from the masked image (eq. 3).
    iamtm_logits: CLIP-vocabulary logits (M, V) of the M masked caption tokens (eq. 4); (B, L, V) with
        `PretrainingPasses.masked_token_logits_only` off.
    iaci_logits: LLM logits (C, V) at the C positions of the IACI rows whose next token is labelled (eq. 6);
        (B, S, V) with `PretrainingPasses.caption_logits_only` off.
    iakr_reconstruction: `K̂` (B, n, D) from the IAKR rows (eq. 7).
    """

    text_knowledge: torch.FloatTensor | None = None
    tim_text_embeddings: torch.FloatTensor | None = None
    tim_image_embeddings: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    tamim_reconstruction: torch.FloatTensor | None = None
    iamtm_logits: torch.FloatTensor | None = None
    iaci_logits: torch.FloatTensor | None = None
    iakr_reconstruction: torch.FloatTensor | None = None


@dataclass
class VIKDFCausalLMOutput(CausalLMOutputWithPast):
    """A causal-LM output that also carries the knowledge `K` (B, n, D) the LLM was given."""

    knowledge: torch.FloatTensor | None = None


class VIKDFKnowledgeAssistedBlock(nn.Module):
    """One transformer block in which the tokens of a masked modality attend to the other modality's knowledge.

    TAMIM (§3.2.2) uses it with masked-image tokens against `K_T`, IAMTM (§3.2.3) with masked-caption tokens
    against `K_I`. As released: multi-head attention and a feed-forward network, each with a residual and a
    post-LayerNorm; dropout on the attention weights and on each branch before its residual sum.
    """

    def __init__(
        self,
        hidden_size: int,
        knowledge_size: int,
        num_heads: int,
        intermediate_size: int,
        hidden_act: str = "relu",
        dropout: float = 0.1,
    ):
        super().__init__()
        self.attention = nn.MultiheadAttention(
            hidden_size, num_heads, dropout=dropout, kdim=knowledge_size, vdim=knowledge_size, batch_first=True
        )
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, intermediate_size), ACT2FN[hidden_act], nn.Linear(intermediate_size, hidden_size)
        )
        self.feed_forward_norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, knowledge: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(hidden_states, knowledge, knowledge, need_weights=False)
        hidden_states = self.attention_norm(hidden_states + self.dropout(attended))
        return self.feed_forward_norm(hidden_states + self.dropout(self.feed_forward(hidden_states)))


class VIKDFPreTrainedModel(PreTrainedModel):
    config_class = VIKDFConfig
    config: VIKDFConfig
    base_model_prefix = "vikdf"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _supports_flash_attn = False  # the IQ-Former is kept in fp32, as BLIP-2's Q-Former is
    # fp16 overflows in the BERT-initialised IQ-Former; bf16/fp16 elsewhere is fine.
    _keep_in_fp32_modules = ["query_tokens", "iq_former"]
    _no_split_modules = ["VIKDFKnowledgeAssistedBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VIKDFForConditionalGeneration):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)
            if module.logit_scale is not None:
                init.constant_(module.logit_scale, torch.tensor(1.0 / self.config.tim_init_temperature).log().item())


class VIKDFForConditionalGeneration(VIKDFPreTrainedModel, GenerationMixin):
    """VIKDF with every part of the paper: frozen CLIP towers, IQ-Former, pre-training heads and a frozen LLM.

    `forward` is the ordinary causal-LM forward with the knowledge `K_T` of `clip_input_ids` written into the
    `<knowledge>` placeholder positions of `input_ids`, so batching, padding, caching and `generate` stay ordinary.
    The other public methods are the pieces the pre-training objectives are built from (see `vikdf.training.losses`).
    """

    main_input_name = "input_ids"

    def __init__(self, config: VIKDFConfig, pretraining_passes: PretrainingPasses | None = None):
        super().__init__(config)
        self.pretraining_passes = pretraining_passes or PretrainingPasses()
        self.generation_config = paper_generation_config(self.generation_config)
        clip = config.clip_config
        iq_width = config.qformer_config.hidden_size
        llm_width = config.text_config.hidden_size

        self.text_encoder = CLIPTextModel._from_config(clip.text_config)
        self.text_projection = nn.Linear(clip.text_config.hidden_size, clip.projection_dim, bias=False)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, iq_width))
        self.iq_former = Blip2QFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(iq_width, llm_width)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)

        self.vision_encoder = self.visual_projection = None
        self.tim_text_projection = self.tim_image_projection = self.logit_scale = None
        self.tamim_block = self.tamim_decoder = self.iamtm_block = self.iamtm_head = self.iakr_head = None
        if config.include_pretraining_heads:
            self._build_pretraining_heads()

        self.post_init()
        self.set_trainable_stage(self.default_stage)

    def _build_pretraining_heads(self) -> None:
        config = self.config
        clip = config.clip_config
        iq_width = config.qformer_config.hidden_size
        patch = clip.vision_config.patch_size
        self.vision_encoder = CLIPVisionModel._from_config(clip.vision_config)
        self.visual_projection = nn.Linear(clip.vision_config.hidden_size, clip.projection_dim, bias=False)
        self.tim_text_projection = nn.Linear(iq_width, config.tim_embed_dim)
        self.tim_image_projection = nn.Linear(iq_width, config.tim_embed_dim)
        # Shape (1,), not 0-dim: DeepSpeed's broadcast of rank 0's weights cannot view a 0-dim tensor as bytes.
        self.logit_scale = nn.Parameter(torch.zeros(1))
        block = dict(
            hidden_size=clip.projection_dim,
            knowledge_size=iq_width,
            num_heads=config.head_num_attention_heads,
            intermediate_size=config.head_intermediate_size,
            hidden_act=config.head_hidden_act,
            dropout=config.head_dropout,
        )
        self.tamim_block = VIKDFKnowledgeAssistedBlock(**block)
        # Conv decoder of §3.2.2: each patch token becomes patch²·3 pixel values, rearranged by a pixel shuffle.
        self.tamim_decoder = nn.Sequential(
            nn.Conv2d(clip.projection_dim, patch * patch * 3, kernel_size=1), nn.PixelShuffle(patch)
        )
        self.iamtm_block = VIKDFKnowledgeAssistedBlock(**block)
        self.iamtm_head = nn.Linear(clip.projection_dim, clip.text_config.vocab_size)
        self.iakr_head = nn.Linear(config.text_config.hidden_size, iq_width)

    # ----------------------------------------------------------------------------------------------------------
    # Which parameters train
    # ----------------------------------------------------------------------------------------------------------
    @property
    def default_stage(self) -> str:
        return "pretrain" if self.config.include_pretraining_heads else "dialogue"

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the frozen parts frozen again (loading replaces parameters).

        A `quantization_config` (bitsandbytes) quantises the LLM's layers alone (`NOT_QUANTISED`); the checkpoint's
        config records it, so a saved quantised model loads quantised again. A damaged weights file is named
        (safetensors' own error names none).
        """
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = llm_only_quantization(kwargs["quantization_config"])
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            damaged = damaged_weight_file(args[0] if args else None)
            name = damaged[0] if damaged else f"A weights file of {args[0] if args else None!r}"
            raise OSError(f"{name} is damaged or truncated ({err}).") from err
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.set_trainable_stage(model.default_stage)
        return loaded

    def set_trainable_stage(self, stage: str) -> None:
        """Make exactly the parts of `stage` ("pretrain", "dialogue" or "frozen") trainable; freeze the rest."""
        if stage not in TRAINABLE_BY_STAGE:
            raise ValueError(f"Unknown stage {stage!r}; choose one of {sorted(TRAINABLE_BY_STAGE)}.")
        trainable = TRAINABLE_BY_STAGE[stage]
        if stage == "pretrain" and not self.config.include_pretraining_heads:
            raise ValueError("This model was built without pre-training heads (include_pretraining_heads=False).")
        for name, parameter in self.named_parameters():
            parameter.requires_grad = name.split(".")[0] in trainable

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Checkpoint the frozen LLM's layers only (what `--activation_checkpointing` turns on).

        The CLIP towers already run without autograd and the IQ-Former's activations are small, so checkpointing
        them costs recomputation for next to no memory (benchmarks/: whole-model checkpointing was slower).
        The LLM also makes its input embeddings require grad, so gradients reach the soft prompts.
        """
        self.language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload
        )

    def save_pretrained(self, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; a model whose LLM was loaded already quantised is saved in the layout it
        was loaded in (transformers 5 cannot undo its bitsandbytes deserialisation at save time, and that layout is
        what loading expects again)."""
        if getattr(self, "is_quantized", False):
            kwargs.setdefault("save_original_format", False)
        return super().save_pretrained(*args, **kwargs)

    def drop_pretraining_heads(self) -> None:
        """Remove the parts only pre-training uses, so that a saved checkpoint holds what inference needs."""
        for name in PRETRAINING_ONLY:
            setattr(self, name, None)
        self.config.include_pretraining_heads = False

    # ----------------------------------------------------------------------------------------------------------
    # Embedding access, delegated to the LLM (resizing for the knowledge token, tying, generation)
    # ----------------------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    @property
    def _logits_are_head_outputs(self) -> bool:
        """Whether the LLM's logits are its output embeddings applied to its base model's last states (Llama, Qwen2,
        Mistral), so the head can run on chosen positions; not for LLMs that cap or scale them (Gemma-2, Cohere)."""
        text = self.config.text_config
        rescaled = getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None)
        return not rescaled and self.language_model.base_model is not self.language_model

    # ----------------------------------------------------------------------------------------------------------
    # Frozen CLIP towers (§3.1.1). The IQ-Former reads the projected states of *all* tokens, not the pooled one.
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, clip_input_ids: torch.LongTensor, clip_attention_mask: torch.Tensor | None = None):
        """CLIP text states `H_T`, projected: (B, L, E)."""
        hidden = self.text_encoder(input_ids=clip_input_ids, attention_mask=clip_attention_mask).last_hidden_state
        return self.text_projection(hidden)

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """CLIP image states `H_I` (CLS + patches), projected: (B, P, E).

        As released, the tower's raw `last_hidden_state` is projected (HF CLIP's `post_layernorm` normalises the
        pooled token only); `config.vision_post_layernorm` normalises every token first, as BLIP-2's `ln_vision`.
        """
        if self.vision_encoder is None:
            raise ValueError("This model has no vision tower (include_pretraining_heads=False); images cannot be encoded.")
        pixel_values = pixel_values.to(self.visual_projection.weight.dtype)
        hidden = self.vision_encoder(pixel_values=pixel_values).last_hidden_state
        if self.config.vision_post_layernorm:
            hidden = self.vision_encoder.post_layernorm(hidden)
        return self.visual_projection(hidden)

    # ----------------------------------------------------------------------------------------------------------
    # IQ-Former (§3.1.2): the same queries and weights distil K_T from text states and K_I from image states.
    # ----------------------------------------------------------------------------------------------------------
    def distill_knowledge(self, states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Knowledge vectors (B, n, D) of the queries cross-attending to `states` (B, L, E)."""
        queries = self.query_tokens.expand(states.shape[0], -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        return self.iq_former(
            query_embeds=queries, encoder_hidden_states=states, encoder_attention_mask=attention_mask
        ).last_hidden_state

    def get_text_knowledge(
        self, clip_input_ids: torch.LongTensor, clip_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`K_T` (B, n, D): the knowledge distilled from text alone, P(K|C) of eq. 1."""
        return self.distill_knowledge(self.encode_text(clip_input_ids, clip_attention_mask), clip_attention_mask)

    def get_image_knowledge(self, pixel_values: torch.FloatTensor) -> torch.Tensor:
        """`K_I` (B, n, D): the knowledge distilled from an image."""
        return self.distill_knowledge(self.encode_image(pixel_values))

    # ----------------------------------------------------------------------------------------------------------
    # Pre-training heads (§3.2, §3.3.2)
    # ----------------------------------------------------------------------------------------------------------
    def tim_embeddings(self, text_knowledge: torch.Tensor, image_knowledge: torch.Tensor):
        """L2-normalised TIM embeddings of eq. 2.

        With `tim_pooling="first"` (the release) both sides are query 0: (B, T) and (B, T). With `"max"` (BLIP-2)
        the text side is query 0 and the image side keeps every query, (B, n, T), for a max over queries.
        """
        text = nn.functional.normalize(self.tim_text_projection(text_knowledge[:, 0]), dim=-1)
        image = nn.functional.normalize(self.tim_image_projection(image_knowledge), dim=-1)
        return text, image[:, 0] if self.config.tim_pooling == "first" else image

    def reconstruct_image(self, masked_image_states: torch.Tensor, text_knowledge: torch.Tensor) -> torch.Tensor:
        """TAMIM (§3.2.2): pixels (B, 3, H, W) rebuilt from masked-image states (B, P, E) assisted by `K_T`."""
        patches = self.tamim_block(masked_image_states, text_knowledge)[:, 1:]  # drop CLS: (B, g·g, E)
        batch, count, width = patches.shape
        grid = int(count**0.5)
        patches = patches.transpose(1, 2).reshape(batch, width, grid, grid)
        return self.tamim_decoder(patches)

    def predict_masked_tokens(
        self, masked_text_states: torch.Tensor, image_knowledge: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """IAMTM (§3.2.3): CLIP-vocabulary logits of masked-caption states (B, L, E) assisted by `K_I`.

        Gives (B, L, V), or (M, V) for the M positions where the boolean `positions` (B, L) is True: eq. 4 needs
        the masked tokens only, and the vocabulary projection of every token is most of the head's memory.
        """
        hidden = self.iamtm_block(masked_text_states, image_knowledge)
        return self.iamtm_head(hidden if positions is None else hidden[positions])

    def knowledge_slot_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Boolean mask (B, S) of the `<knowledge>` placeholders, checked to number exactly n in every row."""
        is_slot = input_ids == self.config.knowledge_token_id
        counts = is_slot.sum(-1)
        n = self.config.num_query_tokens
        if not torch.all(counts == n):
            raise ValueError(
                f"Each sequence must hold exactly num_query_tokens={n} `{self.config.knowledge_token}` placeholders, "
                f"got {counts.tolist()}. Build the inputs with VIKDFProcessor."
            )
        return is_slot

    def knowledge_positions(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Column indices (B, n) of the `<knowledge>` placeholders in each row, in order.

        Not checked and sync-free (no `nonzero`, no count test on the host): a stable sort puts each row's slots
        first. Rows are assumed valid; `knowledge_slot_mask`, which every forward runs first, checks them.
        """
        is_slot = (input_ids == self.config.knowledge_token_id).to(torch.uint8)
        return is_slot.argsort(dim=1, descending=True, stable=True)[:, : self.config.num_query_tokens]

    def reconstruct_knowledge(self, llm_hidden_states: torch.Tensor, input_ids: torch.LongTensor) -> torch.Tensor:
        """IAKR (eq. 7–8): `K̂` (B, n, D) from the LLM's final states one position before each knowledge slot.

        The state before slot k has seen the text and slots 1..k-1 only, so it predicts the k-th vector causally.
        """
        before_slot = self.knowledge_positions(input_ids) - 1  # (B, n)
        index = before_slot.unsqueeze(-1).expand(-1, -1, llm_hidden_states.shape[-1])
        return self.iakr_head(torch.gather(llm_hidden_states, 1, index))

    # ----------------------------------------------------------------------------------------------------------
    # Knowledge injection and the LLM (§3.3.1, §3.4.2)
    # ----------------------------------------------------------------------------------------------------------
    def embed_with_knowledge(self, input_ids: torch.LongTensor, knowledge: torch.Tensor | None) -> torch.Tensor:
        """LLM input embeddings (B, S, H) with `language_projection(knowledge)` at the placeholder positions."""
        embeddings = self.get_input_embeddings()(input_ids)
        if knowledge is None:
            if (input_ids == self.config.knowledge_token_id).any():
                raise ValueError(
                    "input_ids hold `<knowledge>` placeholders but no knowledge was given: pass clip_input_ids "
                    "(the dialogue context for the CLIP text tower) or knowledge."
                )
            return embeddings
        slots = self.knowledge_slot_mask(input_ids).unsqueeze(-1)
        projected = self.language_projection(knowledge.to(self.language_projection.weight.dtype))
        return embeddings.masked_scatter(slots, projected.to(embeddings.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        knowledge: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        logits_positions: torch.BoolTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        **kwargs,
    ) -> VIKDFCausalLMOutput | VIKDFPretrainingOutput:
        """Causal-LM forward of P(R | C, K): `K` from `clip_input_ids` (or given), written into the placeholders.

        With `pixel_values`, a pre-training batch of `vikdf.data.collators.PretrainCollator` instead: see
        `pretraining_forward`.

        Without clip inputs and placeholders this is the frozen LLM alone (the paper's Llama-2 baseline).

        `logits_positions` (B, S), boolean: the LM head runs on these positions only, and `logits` is (M, V) for
        the M True ones, in row-major order. The trainers pass the positions whose next token is labelled (the
        captions of eq. 6, the responses), since at a 32k vocabulary the head over every position is most of the
        LLM's cost. With `labels`, they must cover every labelled next token: the loss is then the LLM's own.
        """
        if pixel_values is not None:
            return self.pretraining_forward(pixel_values, clip_input_ids, clip_attention_mask, **kwargs)
        if knowledge is None and clip_input_ids is not None:
            knowledge = self.get_text_knowledge(clip_input_ids, clip_attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.embed_with_knowledge(input_ids, knowledge)
        if logits_positions is None:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
            )
            loss, logits = outputs.loss, outputs.logits
        else:
            num_items_in_batch = kwargs.pop("num_items_in_batch", None)
            if self._logits_are_head_outputs:
                outputs = self.language_model.base_model(
                    inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
                )
                logits = self.get_output_embeddings()(outputs.last_hidden_state[logits_positions])
            else:
                outputs = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
                logits = outputs.logits[logits_positions]
            loss = None if labels is None else _next_token_loss(logits, labels, logits_positions, num_items_in_batch)
        return VIKDFCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            knowledge=knowledge,
        )

    def pretraining_forward(
        self,
        pixel_values: torch.FloatTensor,
        clip_input_ids: torch.LongTensor,
        clip_attention_mask: torch.Tensor,
        pixel_replaced_mask: torch.BoolTensor,
        clip_masked_input_ids: torch.LongTensor,
        clip_mlm_labels: torch.LongTensor,
        llm_input_ids: torch.LongTensor,
        llm_attention_mask: torch.Tensor,
        llm_labels: torch.LongTensor,
        image_states: torch.FloatTensor | None = None,
    ) -> VIKDFPretrainingOutput:
        """The inputs of the enabled objectives (`enabled_objectives`) for a pre-training batch: B images and
        their captions for CLIP (clean and IAMTM-masked), and the LLM rows, B IACI rows then (with BVIF) B IAKR rows.

        `image_states`: the clean images' projected vision states (B, P, E), when they were computed beforehand
        (cached CLIP features); only the masked images then go through the vision tower.
        """
        objectives = enabled_objectives(self.config)
        images = pixel_values.shape[0]
        outputs = {}
        # Frozen text tower: clean and masked captions in one call (the masked copy only feeds IAMTM).
        if "iamtm" in objectives:
            both = torch.cat([clip_input_ids, clip_masked_input_ids])
            states = self.encode_text(both, clip_attention_mask.repeat(2, 1))
            text_states, masked_text_states = states[:images], states[images:]
        else:
            text_states = self.encode_text(clip_input_ids, clip_attention_mask)
        outputs["text_knowledge"] = text_knowledge = self.distill_knowledge(text_states, clip_attention_mask)

        if {"tim", "tamim", "iamtm"} & set(objectives):
            masked_pixels = apply_pixel_mask(pixel_values, pixel_replaced_mask) if "tamim" in objectives else None
            image_states, masked_image_states = self._image_states(pixel_values, masked_pixels, image_states)
            image_knowledge = self.distill_knowledge(image_states)  # K_I: (B, n, D)
        if "tim" in objectives:
            text_embeddings, image_embeddings = self.tim_embeddings(text_knowledge, image_knowledge)
            outputs["tim_text_embeddings"], outputs["tim_image_embeddings"] = text_embeddings, image_embeddings
            # A copy, so that the output has a grad_fn: DDP's search for unused parameters follows the outputs'
            # graphs, and would mark a bare parameter unused before its gradient arrives.
            outputs["logit_scale"] = self.logit_scale.clone()
        if "tamim" in objectives:
            outputs["tamim_reconstruction"] = self.reconstruct_image(masked_image_states, text_knowledge)
        if "iamtm" in objectives:
            masked = clip_mlm_labels != IGNORE_INDEX if self.pretraining_passes.masked_token_logits_only else None
            outputs["iamtm_logits"] = self.predict_masked_tokens(masked_text_states, image_knowledge, masked)

        wants_iakr = "iakr" in objectives
        outputs["iaci_logits"], iakr_states = self._language_pass(
            llm_input_ids, llm_attention_mask, llm_labels[:images], text_knowledge, wants_iakr
        )
        if wants_iakr:
            outputs["iakr_reconstruction"] = self.reconstruct_knowledge(iakr_states, llm_input_ids[images:])
        return VIKDFPretrainingOutput(**outputs)

    def _image_states(self, pixel_values, masked_pixels, clean_states=None):
        """Frozen vision states (B, P, E) of the clean images (`clean_states` when given) and of the TAMIM-masked ones
        (None without TAMIM), in one pass of the vision tower."""
        if clean_states is None and self.pretraining_passes.one_vision_pass:
            images = pixel_values.shape[0]
            pixels = pixel_values if masked_pixels is None else torch.cat([pixel_values, masked_pixels])
            states = self.encode_image(pixels)
            return states[:images], None if masked_pixels is None else states[images:]
        clean = self.encode_image(pixel_values) if clean_states is None else clean_states
        return clean, None if masked_pixels is None else self.encode_image(masked_pixels)

    def _language_pass(self, llm_input_ids, llm_attention_mask, caption_labels, text_knowledge, wants_iakr: bool):
        """IACI logits (`VIKDFPretrainingOutput.iaci_logits`) and the IAKR rows' final LLM states (B, S, H) (None
        without IAKR): IACI rows then IAKR rows in one LLM call.

        The LM head runs on the IACI rows' caption positions only: nothing reads the IAKR rows' logits, and at a
        32k vocabulary the head over every position cost more than the rest of the LLM (benchmarks/)."""
        images = text_knowledge.shape[0]
        rows = llm_input_ids.shape[0]
        passes = self.pretraining_passes
        if not passes.one_llm_pass and wants_iakr:
            iaci_logits, _ = self._language_pass(
                llm_input_ids[:images], llm_attention_mask[:images], caption_labels, text_knowledge, False
            )
            iakr = self(
                input_ids=llm_input_ids[images:], attention_mask=llm_attention_mask[images:], knowledge=text_knowledge,
                logits_positions=torch.zeros_like(llm_input_ids[images:], dtype=torch.bool),
                output_hidden_states=True, use_cache=False,
            )
            return iaci_logits, iakr.hidden_states[-1]
        if passes.caption_logits_only:
            positions = torch.zeros_like(llm_input_ids, dtype=torch.bool)
            positions[:images] = next_token_positions(caption_labels)
        else:
            positions = None
        outputs = self(
            input_ids=llm_input_ids,
            attention_mask=llm_attention_mask,
            knowledge=text_knowledge.repeat(rows // images, 1, 1),
            logits_positions=positions,
            output_hidden_states=wants_iakr,
            use_cache=False,
        )
        logits = outputs.logits if passes.caption_logits_only else outputs.logits[:images]
        return logits, outputs.hidden_states[-1][images:] if wants_iakr else None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        knowledge: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Zero-resource inference (§3.4.2): context → CLIP text tower → IQ-Former → `K` → LLM → response.

        Inputs come from `VIKDFProcessor` with left padding. Returns the prompt followed by the new tokens, as
        `generate` does for any decoder-only model; `VIKDFProcessor.decode_responses` keeps the new part. Decoding
        follows this model's generation config (the checkpoint's `generation_config.json`, the paper's settings by
        default), not the LLM's; `generate_kwargs` override it.

        As released, the LLM is given the embeddings only, so logits processors see the new tokens alone:
        `no_repeat_ngram_size` blocks repeats within the response, not n-grams of the context, and does not walk
        the prompt's ids at every step.
        """
        if knowledge is None and clip_input_ids is not None:
            knowledge = self.get_text_knowledge(clip_input_ids, clip_attention_mask)
        inputs_embeds = self.embed_with_knowledge(input_ids, knowledge)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("generation_config", self.generation_config)
        with warnings.catch_warnings():  # transformers warns that n-grams of the prompt are not blocked: the intent
            warnings.filterwarnings("ignore", message=".*n-gram constraints only to newly generated tokens")
            outputs = self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
            )
        new_tokens = getattr(outputs, "sequences", outputs)  # (B · returned sequences, new)
        prompt = input_ids.repeat_interleave(new_tokens.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, new_tokens], dim=1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        return outputs


# Every `save_pretrained` then carries this file and its `auto_map` entry (AutoModelForCausalLM is in the config's).
VIKDFForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = [
    "VIKDFForConditionalGeneration",
    "VIKDFPreTrainedModel",
    "VIKDFCausalLMOutput",
    "VIKDFPretrainingOutput",
    "PretrainingPasses",
    "OBJECTIVE_PARTS",
    "enabled_objectives",
    "PAPER_GENERATION",
    "damaged_weight_file",
    "paper_generation_config",
]
