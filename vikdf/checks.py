"""Up-front checks of the entry points' paths and flags, run before any model is loaded.

At 7B a full load takes minutes, so every mistake that can be seen from a path, a flag, a `config.json` or a
file header is reported here, naming the flag and saying what to do.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

from transformers.utils import logging

from configuration_vikdf import TIM_POOLINGS, VIKDFConfig

logger = logging.get_logger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def check_input_file(path: str | None, flag: str) -> None:
    """Raise when `path` (given as `flag`) is not a readable file: missing, a folder, or unreadable."""
    if path is None:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path!r} is a folder, not a file; give the file inside it.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file.")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{flag} {path!r} is not readable.")


def _could_be_hub_id(name: str) -> bool:
    return not os.path.isabs(name) and not name.startswith((".", "~")) and bool(_HUB_ID.match(name))


def _under_a_local_folder(name: str) -> bool:
    """`runs/pretrian` while `runs/` is here: a typo in a local path, though it reads as a Hub id `owner/name`."""
    owner, slash, _ = name.partition("/")
    return bool(slash) and os.path.isdir(owner)


def _no_such_folder(path: str, flag: str) -> str:
    """The message for a missing model folder, with the nearest name in its parent folder when there is one."""
    parent, name = os.path.split(os.path.normpath(path))
    if not parent or not os.path.isdir(parent):
        return f"{flag} {path!r}: no such folder."
    nearest = difflib.get_close_matches(name, os.listdir(parent), n=1)
    hint = f"; did you mean {os.path.join(parent, nearest[0])!r}?" if nearest else "."
    return f"{flag} {path!r}: no such folder in {parent}{hint}"


def check_model_source(path: str, flag: str) -> None:
    """A model folder or hub id: a local path that does not exist says so instead of failing as a Hub download."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path!r} is a file; give the model folder that holds config.json.")
    if not os.path.isdir(path) and (not _could_be_hub_id(path) or _under_a_local_folder(path)):
        raise FileNotFoundError(_no_such_folder(path, flag))
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{flag} {path!r} has no config.json; is it a model folder?")


def load_checkpoint_config(path: str, flag: str = "--model_name_or_path") -> VIKDFConfig:
    """The VIKDF config of checkpoint `path` (folder or hub id), checked as a whole: config and weight files.

    Another model's config or a damaged weights file is refused before anything is built.
    """
    from vikdf.data.files import read_json

    check_model_source(path, flag)
    try:
        if os.path.isdir(path):
            read_json(os.path.join(path, "config.json"))  # transformers' error names neither the fault nor its line
        config = VIKDFConfig.from_pretrained(path)
    except OSError as err:
        if os.path.isdir(path):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"{flag} {path!r}: no such folder, and the Hub has no model of that name ({first_line}).") from err
    except ValueError as err:
        raise ValueError(f"{flag} {path!r}: {err}") from err
    if os.path.isdir(path):
        check_not_trainable_only(path, flag)
        check_weight_files(path)
        check_weight_shapes(path, config)
    return config


def check_not_trainable_only(folder: str, flag: str) -> None:
    """A `checkpoint-N` that holds the trainable parameters only (`vikdf.training.trainable_checkpoints`) is no model."""
    from vikdf.training.frozen_parts import FROZEN_PARTS_NAME

    if (Path(folder) / FROZEN_PARTS_NAME).is_file():
        raise ValueError(
            f"{flag} {folder!r} is a training checkpoint holding the trainable parameters only ({FROZEN_PARTS_NAME} "
            "records the frozen parts it needs): continue that run with --resume_from_checkpoint, or load the run's "
            "output folder (a whole model) or a checkpoint written with --save_full_model."
        )


def check_weight_files(folder: str | os.PathLike) -> None:
    """Open the header of every `*.safetensors` file of `folder`: a truncated or damaged file is named."""
    from modeling_vikdf import damaged_weight_file

    if damaged := damaged_weight_file(folder):
        file, error = damaged
        raise OSError(f"{file} is damaged or truncated ({error}); copy or save the checkpoint again.") from error


def check_weight_shapes(folder: str | os.PathLike, config: VIKDFConfig) -> None:
    """Compare every tensor of `folder`'s `*.safetensors` files with the shape `config` gives it.

    A `config.json` that does not belong to its weights is named here with the tensor and both shapes; transformers
    would stop at the load and suggest `ignore_mismatched_sizes`, which re-initialises trained weights. The packed
    weights of a quantised LLM's layers (`vikdf.training.quantization`) have shapes of their own and are not compared.
    """
    import torch
    from safetensors import safe_open

    from modeling_vikdf import VIKDFForConditionalGeneration

    with torch.device("meta"):  # shapes only: nothing is allocated, even at 7B
        model = VIKDFForConditionalGeneration(copy.deepcopy(config))
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if getattr(config, "quantization_config", None) is not None:
        for name, module in model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear) and module is not model.language_model.get_output_embeddings():
                expected.pop(f"language_model.{name}.weight")
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                shape = tuple(weights.get_slice(name).get_shape())
                if name in expected and shape != expected[name]:
                    raise ValueError(
                        f"{file} holds {name} of shape {shape} but {Path(folder) / 'config.json'} makes it "
                        f"{expected[name]}: the config does not belong to these weights. Restore the config.json "
                        "saved with them, or save the checkpoint again."
                    )


def config_fields() -> list[str]:
    """The VIKDF-specific config fields `--config_overrides` may set (the sub-configs are not among them)."""
    own = vars(VIKDFConfig).get("__annotations__", {})
    return [name for name in own if name not in VIKDFConfig.sub_configs_defaults]


def parse_config_overrides(text: str, flag: str = "--config_overrides") -> dict[str, Any]:
    """The JSON object of `flag`, its keys checked against the config's fields."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} is not valid JSON ({err}): {text!r}. Example: '{{\"loss_weight_tim\": 0.5}}'.") from err
    if not isinstance(overrides, dict):
        raise ValueError(f"{flag} must be a JSON object of config fields, got {type(overrides).__name__}: {text!r}.")
    valid = config_fields()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"{flag}: unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}.")
    return overrides


def check_config_fields(config: VIKDFConfig, fields: dict[str, Any], flag: str = "--config_overrides") -> None:
    """Validate `config` with `fields` set, as the model will be built from it (`VIKDFConfig.validate_fields`),
    leaving `config` as it is."""
    try:
        VIKDFConfig.from_dict({**config.to_dict(), **fields})
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from err


def check_parts_config(
    clip: str, bert: str, llm: str, fields: dict[str, Any], flag: str = "--config_overrides"
) -> None:
    """Validate the config `build_vikdf_from_components` will make from CLIP, BERT and the LLM (folders or hub ids)
    with `fields` set, from their config files alone: a bad field costs no tower load."""
    from transformers import AutoConfig

    from vikdf.training.components import vikdf_config_from_parts

    try:
        vikdf_config_from_parts(*(AutoConfig.from_pretrained(part) for part in (clip, bert, llm)), **fields)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from err


def check_positive(value: int | float | None, flag: str) -> None:
    """Refuse a count, size or length below 1 (None: the flag was not given)."""
    if value is not None and value < 1:
        raise ValueError(f"{flag} {value} must be positive.")


def check_device(device: str | None, flag: str = "--device") -> None:
    """A device torch knows and can see: `cuda` without a GPU would otherwise fail at the model load."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{flag} {device!r} is not a device ({err}); use cpu, cuda or cuda:N.") from err
    if parsed.type != "cuda":
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not visible:
        raise ValueError(f"{flag} {device} but no GPU is visible to torch; use --device cpu, or leave the flag out.")
    if parsed.index is not None and parsed.index >= visible:
        raise ValueError(f"{flag} {device} but torch sees {visible} GPU(s), cuda:0 to cuda:{visible - 1}.")


def check_num_query_tokens(value: int | None, flag: str = "--num_query_tokens") -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} {value}: the number of queries must be positive (paper: 32).")


def check_tim_pooling(value: str, flag: str = "--tim_pooling") -> None:
    if value not in TIM_POOLINGS:
        raise ValueError(f"{flag} {value!r}; choose one of {', '.join(TIM_POOLINGS)}.")


def check_continued_query_count(config: VIKDFConfig, requested: int | None, path: str) -> None:
    """A trained checkpoint's query count is fixed (its queries and processor slots); refuse a different one."""
    if requested is not None and requested != config.num_query_tokens:
        raise ValueError(
            f"--num_query_tokens {requested} but {path} was trained with {config.num_query_tokens} queries; a "
            "checkpoint's query count cannot change. Drop the flag, or build a new model from components."
        )


def llm_positions(config: VIKDFConfig) -> int | None:
    return getattr(config.text_config, "max_position_embeddings", None)


def check_max_length(config: VIKDFConfig, max_length: int | None, flag: str = "--max_length") -> None:
    """Refuse a sequence length beyond the LLM's positions."""
    positions = llm_positions(config)
    if max_length is None:
        return
    check_positive(max_length, flag)
    if positions is not None and max_length > positions:
        raise ValueError(f"{flag} {max_length} exceeds the LLM's {positions} positions; use at most {positions}.")


def check_max_length_fits_layout(processor, with_knowledge: bool, flag: str = "--max_length") -> None:
    """Refuse a `max_length` that leaves no room for a context token after the template, the knowledge slots and
    the response (`VIKDFProcessor.response_budget`: `max_response_length`, or up to half of `max_length`)."""
    overhead = len(processor.dialogue_prompt_ids("", with_knowledge))
    response = processor.response_budget
    fixed = processor.max_response_length
    least = 2 * (overhead + 1) if fixed is None else overhead + 1 + fixed
    if processor.max_length - response <= overhead:
        raise ValueError(
            f"{flag} {processor.max_length} leaves no room for the context: the chat template and "
            f"{processor.num_query_tokens if with_knowledge else 0} knowledge slots take {overhead} tokens and the "
            f"response up to {response}; use at least {least}."
        )


def check_max_new_tokens(config: VIKDFConfig, max_new_tokens: int, flag: str = "--max_new_tokens") -> None:
    positions = llm_positions(config)
    check_positive(max_new_tokens, flag)
    if positions is not None and max_new_tokens >= positions:
        raise ValueError(f"{flag} {max_new_tokens} leaves no room for a prompt in the LLM's {positions} positions.")


def fit_generation_length(config: VIKDFConfig, processor, max_new_tokens: int) -> None:
    """Shorten the processor's prompts when prompt + `max_new_tokens` would run past the LLM's positions."""
    check_max_new_tokens(config, max_new_tokens)
    positions = llm_positions(config)
    if positions is None or processor.max_length + max_new_tokens <= positions:
        return
    fitted = positions - max_new_tokens
    # Once per process: the demo evaluates 16 systems with the same lengths, and one line tells it all.
    logger.warning_once(
        f"Prompts of up to {processor.max_length} tokens plus --max_new_tokens {max_new_tokens} exceed the LLM's "
        f"{positions} positions; contexts are truncated to {fitted} prompt tokens."
    )
    processor.max_length = fitted


def check_glove_file(path: str | None, flag: str = "--glove_path") -> None:
    """A GloVe text file: readable, its first line `word v1 ... vD`, every line as wide (a full scan, cached for
    the metrics later, `vikdf.evaluation.dialogue_metrics.load_glove`)."""
    if path is None:
        return
    check_input_file(path, flag)
    with open(path, "rb") as f:
        first = f.readline().rstrip()
    word, _, rest = first.partition(b" ")
    numbers = rest.split()
    try:
        [float(value) for value in numbers]
    except ValueError:
        numbers = []
    if not word or len(numbers) < 2:
        raise ValueError(
            f"{flag} {path!r} is not a GloVe text file: its first line {first[:60]!r} is not 'word v1 ... vD' "
            "(e.g. glove.6B.300d.txt; word2vec files with a header line are not supported)."
        )
    from vikdf.evaluation.dialogue_metrics import load_glove

    try:
        load_glove(path)
    except ValueError as err:
        raise ValueError(f"{flag}: {err}") from err


__all__ = [
    "check_input_file",
    "check_model_source",
    "load_checkpoint_config",
    "check_weight_files",
    "check_weight_shapes",
    "config_fields",
    "parse_config_overrides",
    "check_config_fields",
    "check_parts_config",
    "check_positive",
    "check_device",
    "check_num_query_tokens",
    "check_tim_pooling",
    "check_continued_query_count",
    "check_max_length",
    "check_max_length_fits_layout",
    "check_max_new_tokens",
    "fit_generation_length",
    "check_glove_file",
]
