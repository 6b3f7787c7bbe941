"""Configuration of VIKDF (paper §3, §4.2).

Hub remote code: this file travels with every checkpoint, so it imports only transformers and `pipeline_vikdf`
(which it names in `custom_pipelines`; importing it here is what makes that file travel with the config).
"""

from transformers import AutoConfig, Blip2QFormerConfig, CLIPConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

try:
    from .pipeline_vikdf import VIKDFDialoguePipeline
except ImportError:
    from pipeline_vikdf import VIKDFDialoguePipeline

# Instruction prompts of the two BVIF paths (paper §3.3). The paper quotes one of each; the released code samples
# one of 11 per example, so we keep 11 of our own in the same spirit, the paper's sentence first.
CAPTION_PROMPTS = (
    "Write a short description for the image.",
    "Describe the image briefly.",
    "What does the image show? Answer in one sentence.",
    "Give a brief caption for this picture.",
    "Summarise the content of the image in a few words.",
    "Provide a one-sentence description of what is pictured.",
    "Tell me what you see in the image.",
    "Write a caption that fits the image.",
    "Briefly say what is happening in the picture.",
    "Describe the scene in the image concisely.",
    "What is in this photo? Describe it shortly.",
)
RECONSTRUCTION_PROMPTS = (
    "Create an image that reflects the following description:",
    "Imagine a picture that matches this caption:",
    "Picture the scene described here:",
    "Form a visual impression of the following text:",
    "Think of an image that this sentence describes:",
    "Visualise what the following words depict:",
    "Render in your mind an image for this description:",
    "Envision the photo this caption was written for:",
    "Recall an image that fits the text below:",
    "Sketch mentally the scene this text describes:",
    "Build a mental image from the following caption:",
)

# Shapes of the paper's setting (§4.2): CLIP ViT-L/14, BERT-base IQ-Former, Llama-2-7B.
CLIP_VIT_L14 = {
    "projection_dim": 768,
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "projection_dim": 768,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
    },
}
BERT_BASE_IQ_FORMER = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "cross_attention_frequency": 2,
    "encoder_hidden_size": 768,
    "use_qformer_text_input": False,
}
LLAMA_2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

TIM_POOLINGS = ("first", "max")
# How a dialogue checkpoint was fine-tuned (§3.4): "vikdf" reads the knowledge slots; "lora" is the Table-4 baseline,
# LoRA on the LLM with the same chat template and no knowledge, so it is run without knowledge.
DIALOGUE_METHODS = ("vikdf", "lora")
LOSS_WEIGHTS = ("loss_weight_tim", "loss_weight_tamim", "loss_weight_iamtm", "loss_weight_iaci", "loss_weight_iakr")
PROBABILITIES = ("mask_ratio", "mask_keep_ratio", "text_mask_ratio", "text_mask_keep_ratio", "head_dropout")
POSITIVE_SIZES = ("mask_patch_size", "head_num_attention_heads", "head_intermediate_size", "tim_embed_dim",
                  "caption_max_length", "clip_max_length")


class VIKDFConfig(PreTrainedConfig):
    r"""
    Configuration of [`VIKDFForConditionalGeneration`]. Defaults reproduce the paper (§4.2).

    Args:
        clip_config: the frozen CLIP text and image towers (a [`CLIPConfig`]); its `projection_dim` is the width the
            IQ-Former cross-attends to, because it reads the *projected* hidden states of all tokens.
        qformer_config: the IQ-Former (a [`Blip2QFormerConfig`], BERT-base shaped); `encoder_hidden_size` must equal
            `clip_config.projection_dim`.
        text_config: the frozen causal LLM (any `AutoModelForCausalLM` config: Llama, Qwen2, Mistral, ...).
        num_query_tokens: n, the number of learnable queries and knowledge slots (32).
        tim_embed_dim: width of the TIM projections (eq. 2).
        tim_pooling: how a set of n knowledge vectors becomes one TIM embedding: `"first"` (query 0, as released) or
            `"max"` (BLIP-2: maximum similarity over queries).
        tim_init_temperature: initial value of the learnable temperature τ.
        mask_patch_size, mask_ratio: TAMIM chooses ⌈mask_ratio · patches⌉ square patches of `mask_patch_size`
            pixels (28, 0.6: 39 of 64 at 224, as released) and scores the L1 loss on all of them.
        mask_keep_ratio: probability that a vision-patch-sized sub-patch (14×14) of a chosen patch is left
            unchanged instead of set to 0; it is scored all the same. 0.2 as released; 0 is the paper's plain
            masking of every chosen pixel.
        text_mask_ratio: IAMTM chooses each caption token with this probability (0.15) and scores all chosen.
        text_mask_keep_ratio: probability that a chosen caption token is left unchanged instead of replaced by
            CLIP's end-of-text id; it is scored all the same. 0.2 as released; 0 replaces every chosen token.
        vision_post_layernorm: apply the vision tower's `post_layernorm` to every image token before the
            projection, as BLIP-2's `ln_vision` does. False (the release): the raw `last_hidden_state` is
            projected; HF CLIP normalises only the pooled token.
        head_num_attention_heads, head_intermediate_size, head_hidden_act, head_dropout: the transformer blocks of
            the TAMIM and IAMTM heads (released: 4 heads, 4× feed-forward with ReLU, dropout 0.1 on the attention
            weights and on both residual branches).
        caption_max_length: the most LLM tokens a caption keeps (its start) in the IACI and IAKR rows; the release
            cuts its LLM caption rows at 256 tokens.
        caption_loss_on_eos: also score the end-of-sequence after the caption in IACI. False as released, whose
            LLM pads with eos and so drops eos from the labels with the padding.
        loss_weight_tim, loss_weight_tamim, loss_weight_iamtm, loss_weight_iaci, loss_weight_iakr: λ1..λ5 of eq. 5
            and eq. 9.
        use_tim, use_tamim, use_iamtm, use_bvif: ablation switches of Table 3. Without BVIF the integration stage is
            a plain BLIP-2 style generative loss: the caption path with no instruction and no IAKR.
        caption_prompts, reconstruction_prompts: the instruction prompts of IACI and IAKR (11 each).
        knowledge_token: the placeholder the processor writes n times; its embedding is replaced by the knowledge.
        knowledge_token_id: id of that token in the LLM vocabulary.
        clip_max_length: the CLIP text tower's context (77 tokens).
        include_pretraining_heads: when False the vision tower and the TIM/TAMIM/IAMTM/IAKR heads are left out,
            which is all zero-resource inference needs.
        dialogue_method: how the dialogue checkpoint was fine-tuned, one of `DIALOGUE_METHODS`: `"vikdf"` (the
            default, also of configs saved before the field existed) or `"lora"`, the Table-4 baseline that every
            entry point runs without knowledge.
    """

    model_type = "vikdf"
    sub_configs_defaults = {
        "clip_config": SubConfigSpec(CLIPConfig, init_kwargs=CLIP_VIT_L14),
        "qformer_config": SubConfigSpec(Blip2QFormerConfig, init_kwargs=BERT_BASE_IQ_FORMER),
        "text_config": SubConfigSpec(AutoConfig, model_type="llama", init_kwargs=LLAMA_2_7B),
    }

    clip_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    tim_embed_dim: int = 256
    tim_pooling: str = "first"
    tim_init_temperature: float = 0.07
    mask_patch_size: int = 28
    mask_ratio: float = 0.6
    mask_keep_ratio: float = 0.2
    text_mask_ratio: float = 0.15
    text_mask_keep_ratio: float = 0.2
    vision_post_layernorm: bool = False
    head_num_attention_heads: int = 4
    head_intermediate_size: int = 3072
    head_hidden_act: str = "relu"
    head_dropout: float = 0.1
    caption_max_length: int = 256
    caption_loss_on_eos: bool = False
    loss_weight_tim: float = 0.5
    loss_weight_tamim: float = 0.2
    loss_weight_iamtm: float = 0.2
    loss_weight_iaci: float = 1.0
    loss_weight_iakr: float = 0.5
    use_tim: bool = True
    use_tamim: bool = True
    use_iamtm: bool = True
    use_bvif: bool = True
    caption_prompts: list[str] | None = None
    reconstruction_prompts: list[str] | None = None
    knowledge_token: str = "<knowledge>"
    knowledge_token_id: int | None = None
    clip_max_length: int = 77
    include_pretraining_heads: bool = True
    dialogue_method: str = "vikdf"
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.caption_prompts is None:
            self.caption_prompts = list(CAPTION_PROMPTS)
        if self.reconstruction_prompts is None:
            self.reconstruction_prompts = list(RECONSTRUCTION_PROMPTS)
        # Checkpoints load through AutoModel and AutoModelForCausalLM alike (trust_remote_code=True).
        auto_map = getattr(self, "auto_map", None) or {}
        auto_map.setdefault("AutoModelForCausalLM", "modeling_vikdf.VIKDFForConditionalGeneration")
        self.auto_map = auto_map
        # `pipeline("text-generation", model=folder, trust_remote_code=True)` runs the whole VIKDF path.
        self.custom_pipelines = {
            "text-generation": {
                "impl": f"pipeline_vikdf.{VIKDFDialoguePipeline.__name__}",
                "pt": ["AutoModelForCausalLM"],
                "type": "text",
            }
        }
        self.validate_fields()

    def validate_fields(self) -> None:
        """Raise a ValueError naming the field when a value makes no sense or two parts of the model cannot be wired
        together. The entry points run it on the config they will build before any tower loads
        (`vikdf.checks.check_config_fields`)."""
        for name in LOSS_WEIGHTS:
            # λ1..λ5 weigh losses that are minimised (eq. 5, eq. 9): a negative weight would maximise its loss.
            if not getattr(self, name) >= 0:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be 0 (objective off) or positive; a negative weight would "
                    "maximise its loss."
                )
        for name in PROBABILITIES:
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1]; it is a probability or share.")
        for name in POSITIVE_SIZES:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive.")
        projection_dim = self.clip_config.projection_dim
        if self.qformer_config.encoder_hidden_size != projection_dim:
            raise ValueError(
                f"qformer_config.encoder_hidden_size={self.qformer_config.encoder_hidden_size} but the IQ-Former "
                f"cross-attends to CLIP's projected states of width clip_config.projection_dim={projection_dim}. "
                "Set both to the same width."
            )
        if projection_dim % self.head_num_attention_heads:
            raise ValueError(
                f"head_num_attention_heads={self.head_num_attention_heads} does not divide the TAMIM/IAMTM head "
                f"width clip_config.projection_dim={projection_dim}."
            )
        vision = self.clip_config.vision_config
        if self.mask_patch_size % vision.patch_size or vision.image_size % self.mask_patch_size:
            raise ValueError(
                f"mask_patch_size={self.mask_patch_size} must be a multiple of the vision patch size "
                f"({vision.patch_size}) and divide the image size ({vision.image_size})."
            )
        from transformers.activations import ACT2FN  # imports torch: not at import time, which --help and Hub configs need

        if self.head_hidden_act not in ACT2FN:
            raise ValueError(
                f"head_hidden_act={self.head_hidden_act!r} is not a transformers activation; choose one of "
                f"{sorted(ACT2FN)}."
            )
        if not isinstance(self.num_query_tokens, int) or self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens={self.num_query_tokens!r}; it must be a positive number of queries (paper: 32).")
        if self.dialogue_method not in DIALOGUE_METHODS:
            raise ValueError(f"dialogue_method={self.dialogue_method!r}; choose one of {DIALOGUE_METHODS}.")
        if self.tim_pooling not in TIM_POOLINGS:
            raise ValueError(f"tim_pooling={self.tim_pooling!r}; choose one of {TIM_POOLINGS}.")
        if len(self.caption_prompts) == 0 or len(self.reconstruction_prompts) == 0:
            raise ValueError("caption_prompts and reconstruction_prompts need at least one prompt each.")
        if self.clip_max_length > self.clip_config.text_config.max_position_embeddings:
            raise ValueError(
                f"clip_max_length={self.clip_max_length} exceeds the CLIP text tower's "
                f"max_position_embeddings={self.clip_config.text_config.max_position_embeddings}."
            )

    @property
    def dialogue_with_knowledge(self) -> bool:
        """Whether dialogue runs with the knowledge slots: every method but the LoRA baseline, which was fine-tuned
        without them (Table 4) and so answers without them."""
        return self.dialogue_method != "lora"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "VIKDFConfig":
        """A saved VIKDF config; another model's config, or one without the three sub-configs, is refused.

        transformers only warns on a foreign `model_type`, and missing sub-configs fall back to the paper's 7B
        shapes, so a wrong `config.json` would otherwise build (and run out of memory on) a model nobody saved.
        """
        model_type = config_dict.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(
                f"config.json has model_type={model_type!r}, not {cls.model_type!r}: this folder is not a VIKDF "
                "checkpoint (build one with train_pretrain.py or "
                "vikdf.training.components.build_vikdf_from_components)."
            )
        missing = [name for name in cls.sub_configs_defaults if not config_dict.get(name)]
        if missing:
            raise ValueError(f"VIKDF config.json lacks {', '.join(missing)}; it is incomplete, save the checkpoint again.")
        return super().from_dict(config_dict, **kwargs)


VIKDFConfig.register_for_auto_class()
# `AutoTokenizer.from_pretrained(checkpoint)` (which `VIKDFProcessor.from_pretrained` runs) reads the folder's config:
# with the type registered it needs no remote code, so it does not stop to ask whether to trust it.
AutoConfig.register(VIKDFConfig.model_type, VIKDFConfig, exist_ok=True)

__all__ = ["DIALOGUE_METHODS", "VIKDFConfig"]
