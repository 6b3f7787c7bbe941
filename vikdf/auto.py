"""Importing this registers VIKDF's model and processor with transformers' Auto classes (`configuration_vikdf`
registers the config), so that `AutoModel.from_pretrained(folder)` of a VIKDF checkpoint uses the installed classes
(no `trust_remote_code`). `vikdf.evaluation.dialogues`, the library's checkpoint loader, imports it."""

from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor

from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration
from processing_vikdf import VIKDFProcessor

AutoModel.register(VIKDFConfig, VIKDFForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(VIKDFConfig, VIKDFForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VIKDFConfig, VIKDFProcessor, exist_ok=True)

__all__ = ["VIKDFConfig", "VIKDFForConditionalGeneration", "VIKDFProcessor"]
