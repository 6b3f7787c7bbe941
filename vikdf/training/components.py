"""Build a fresh VIKDF from pretrained parts, by hub id or local folder (paper §4.2).

CLIP gives the frozen text and image towers with their projections, BERT initialises the IQ-Former, and the LLM
is used as it is, with the `<knowledge>` placeholder added to its vocabulary.
"""

import re

import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    Blip2QFormerConfig,
    CLIPConfig,
    CLIPModel,
)
from transformers.utils import logging

from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration, paper_generation_config
from processing_vikdf import VIKDFProcessor
from vikdf.defaults import DEFAULT_BERT, DEFAULT_CLIP, DEFAULT_LLM

logger = logging.get_logger(__name__)


# BERT → Blip2QFormerModel key map. The Q-Former names its self-attention `attention.attention` and its embedding
# LayerNorm `layernorm`; queries have their own FFN (`intermediate_query`/`output_query`) that LAVIS initialises
# from BERT's FFN too. Cross-attention layers have no BERT counterpart and start random.
BERT_TO_IQ_FORMER = (
    (r"^embeddings\.LayerNorm\.", "layernorm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.", r"encoder.layer.\1.attention.attention."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.", r"encoder.layer.\1.attention.output."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.", r"encoder.layer.\1.intermediate_query."),
    (r"^encoder\.layer\.(\d+)\.output\.", r"encoder.layer.\1.output_query."),
)


def iq_former_config_from_bert(bert: BertConfig, encoder_hidden_size: int, cross_attention_frequency: int = 2) -> Blip2QFormerConfig:
    """An IQ-Former config of BERT's shape that cross-attends (every 2nd layer) to width `encoder_hidden_size`."""
    return Blip2QFormerConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        hidden_dropout_prob=bert.hidden_dropout_prob,
        attention_probs_dropout_prob=bert.attention_probs_dropout_prob,
        max_position_embeddings=bert.max_position_embeddings,
        layer_norm_eps=bert.layer_norm_eps,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=False,
    )


def vikdf_config_from_parts(clip_config: CLIPConfig, bert_config: BertConfig, text_config, **fields) -> VIKDFConfig:
    """The VIKDF config over CLIP's, BERT's and the LLM's configs, `fields` being VIKDFConfig's own; its validation
    runs here, so `vikdf.checks` can build it from the parts' config files before any tower loads."""
    qformer_config = iq_former_config_from_bert(bert_config, clip_config.projection_dim)
    qformer_config._name_or_path = bert_config.name_or_path  # for the model card's list of bases
    return VIKDFConfig(clip_config=clip_config, qformer_config=qformer_config, text_config=text_config, **fields)


def bert_to_iq_former_state_dict(bert_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename BERT weights into the IQ-Former's names; weights with no IQ-Former counterpart are dropped."""
    mapped = {}
    for key, tensor in bert_state.items():
        for pattern, replacement in BERT_TO_IQ_FORMER:
            if re.match(pattern, key):
                mapped[re.sub(pattern, replacement, key)] = tensor
                break
    return mapped


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in state.items()}


def build_vikdf_from_components(
    clip: str = DEFAULT_CLIP,
    bert: str = DEFAULT_BERT,
    llm: str = DEFAULT_LLM,
    num_query_tokens: int = 32,
    dtype: torch.dtype | None = None,
    quantization_config=None,
    **config_overrides,
) -> tuple[VIKDFForConditionalGeneration, VIKDFProcessor]:
    """A fresh VIKDF from pretrained CLIP, BERT and LLM (hub ids or folders), with its processor.

    `config_overrides` go to `VIKDFConfig` (loss weights, ablation switches, masking, ...). `dtype` is the dtype
    of the frozen towers and the LLM (the IQ-Former stays fp32). A bitsandbytes `quantization_config` quantises
    the LLM's layers alone (`vikdf.training.quantization`).
    """
    logger.info(f"Building VIKDF from CLIP={clip}, BERT={bert}, LLM={llm}")
    clip_model = CLIPModel.from_pretrained(clip, dtype=dtype)
    bert_model = BertModel.from_pretrained(bert, add_pooling_layer=False)
    llm_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
    processor = VIKDFProcessor(
        image_processor=AutoImageProcessor.from_pretrained(clip),
        tokenizer=AutoTokenizer.from_pretrained(llm),
        clip_tokenizer=AutoTokenizer.from_pretrained(clip),
        num_query_tokens=num_query_tokens,
        clip_max_length=clip_model.config.text_config.max_position_embeddings,
    )
    if len(processor.tokenizer) > llm_model.get_input_embeddings().num_embeddings:
        # transformers draws the new `<knowledge>` row from the global RNG: the entry points seed it first (--seed),
        # so a resumed run rebuilds the same frozen LLM (its fingerprint is checked, `vikdf.training.frozen_parts`).
        llm_model.resize_token_embeddings(len(processor.tokenizer))

    config = vikdf_config_from_parts(
        clip_model.config,
        bert_model.config,
        llm_model.config,
        num_query_tokens=num_query_tokens,
        knowledge_token=processor.knowledge_token,
        knowledge_token_id=processor.knowledge_token_id,
        clip_max_length=processor.clip_max_length,
        **config_overrides,
    )
    state = {
        **_prefixed(clip_model.text_model.state_dict(), "text_encoder."),
        **_prefixed(clip_model.text_projection.state_dict(), "text_projection."),
        **_prefixed(bert_to_iq_former_state_dict(bert_model.state_dict()), "iq_former."),
        **_prefixed(llm_model.state_dict(), "language_model."),
    }
    if config.include_pretraining_heads:
        state.update(_prefixed(clip_model.vision_model.state_dict(), "vision_encoder."))
        state.update(_prefixed(clip_model.visual_projection.state_dict(), "visual_projection."))
    model = VIKDFForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, quantization_config=quantization_config
    )
    model.generation_config = paper_generation_config(llm_model.generation_config)  # its ids, the paper's decoding
    return model, processor


__all__ = [
    "build_vikdf_from_components",
    "bert_to_iq_former_state_dict",
    "iq_former_config_from_bert",
    "vikdf_config_from_parts",
]
