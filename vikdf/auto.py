"""Importing this registers VIKDF's config, model and processor with transformers' Auto classes, so that
`AutoModel.from_pretrained(folder)` of a VIKDF checkpoint uses the installed classes (no `trust_remote_code`)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration
from processing_vikdf import VIKDFProcessor

AutoConfig.register(VIKDFConfig.model_type, VIKDFConfig, exist_ok=True)
AutoModel.register(VIKDFConfig, VIKDFForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(VIKDFConfig, VIKDFForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VIKDFConfig, VIKDFProcessor, exist_ok=True)

__all__ = ["VIKDFConfig", "VIKDFForConditionalGeneration", "VIKDFProcessor"]
