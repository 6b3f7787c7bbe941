"""VIKDF training-side library: component loading, losses, trainers, data, metrics and the tiny test world.

The model itself lives in the three root files that travel with every checkpoint (`configuration_vikdf.py`,
`modeling_vikdf.py`, `processing_vikdf.py`). Importing `vikdf` registers them with the Auto classes, so a
checkpoint folder loads with the installed classes (no `trust_remote_code` prompt) wherever the library is used;
users without the library load the same folder with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration
from processing_vikdf import VIKDFProcessor

AutoConfig.register(VIKDFConfig.model_type, VIKDFConfig, exist_ok=True)
AutoModel.register(VIKDFConfig, VIKDFForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(VIKDFConfig, VIKDFForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VIKDFConfig, VIKDFProcessor, exist_ok=True)

__all__ = ["VIKDFConfig", "VIKDFForConditionalGeneration", "VIKDFProcessor"]
