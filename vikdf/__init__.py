"""VIKDF training-side library: component loading, losses, trainers, data, metrics and the tiny test world.

The model itself lives in the three root files that travel with every checkpoint (`configuration_vikdf.py`,
`modeling_vikdf.py`, `processing_vikdf.py`); they are re-exported here for convenience.
"""

from configuration_vikdf import VIKDFConfig
from modeling_vikdf import VIKDFForConditionalGeneration
from processing_vikdf import VIKDFProcessor

__all__ = ["VIKDFConfig", "VIKDFForConditionalGeneration", "VIKDFProcessor"]
