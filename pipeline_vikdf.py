"""The VIKDF dialogue pipeline and knowledge textualisation (paper §3.4.2, §5.4).

    from transformers import pipeline
    chat = pipeline("text-generation", model="path/to/checkpoint", trust_remote_code=True)
    chat(["what a beautiful sky tonight.", "i always wonder what is up there."], return_knowledge=True)
    # {"generated_text": "...", "knowledge": "..."}

The config's `custom_pipelines` maps "text-generation" to `VIKDFDialoguePipeline`, so this pipeline, not the
generic text-generation one, runs a VIKDF checkpoint: context → CLIP text tower → IQ-Former → `K` → LLM → response,
with the checkpoint's generation config (the released decoding, written by `modeling_vikdf.paper_generation_config`).

Hub remote code: this file travels with every checkpoint, so it imports only torch and transformers.
"""

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Pipeline


@torch.no_grad()
def textualise_knowledge(
    model, processor, contexts: Sequence[Any], prompt: str | None = None, batch_size: int = 16, **generate_kwargs: Any
) -> list[str]:
    """Text the LLM writes from the knowledge `K` distilled from each context (no image, no context text).

    The LLM reads `K` in the IACI caption layout, `[bos] <k>×n {caption prompt}`, exactly the prefix it was
    pre-trained with, and writes what it "sees" (a chat template's reply marker it writes first is dropped,
    `VIKDFProcessor.without_reply_marker`). `prompt` defaults to the model's first caption prompt (the paper's
    "Write a short description for the image."); `generate_kwargs` override the checkpoint's generation config.
    """
    if prompt is None:
        prompt = model.config.caption_prompts[0]
    generate_kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    generate_kwargs.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
    prefix = torch.tensor([processor.caption_prompt_ids(prompt)], device=model.device)
    model.eval()
    texts: list[str] = []
    for start in range(0, len(contexts), batch_size):
        chunk = [processor.context_turns(context) for context in contexts[start : start + batch_size]]
        clip = {name: tensor.to(model.device) for name, tensor in processor.clip_text_inputs(chunk).items()}
        knowledge = model.get_text_knowledge(clip["clip_input_ids"], clip["clip_attention_mask"])
        input_ids = prefix.repeat(len(chunk), 1)  # the same prompt in every row: no padding
        generated = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), knowledge=knowledge, **generate_kwargs
        )
        texts.extend(map(processor.without_reply_marker, processor.decode_responses(generated, input_ids.shape[1])))
    return texts


class VIKDFDialoguePipeline(Pipeline):
    """Zero-resource dialogue generation with VIKDF: `pipeline(context)` → `{"generated_text": response}`.

    Input: one context (a string, a list of turns, or chat messages) or a list of contexts (a list of lists).
    `return_knowledge=True` adds `"knowledge"`, the knowledge distilled from the context put into words (§5.4).
    Further keyword arguments go to `generate` and override the checkpoint's generation config. A LoRA-baseline
    checkpoint (`dialogue_method="lora"`) runs without knowledge, as it was trained.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __call__(self, inputs: Any, **kwargs: Any):
        if isinstance(inputs, Sequence) and not isinstance(inputs, str) and not inputs:
            raise ValueError(
                "The pipeline got an empty list: pass a context (a string, a list of turns or of chat messages) or a "
                "list of contexts."
            )
        # Anything but a list of lists is one context; `context_turns` refuses what is not one (None, a number).
        context_turns = self.processor.context_turns
        single = not isinstance(inputs, Sequence) or isinstance(inputs, str) or not isinstance(inputs[0], (list, tuple))
        contexts = [inputs] if single else list(inputs)
        # Wrapped, so that the base class neither splits a list of turns into a batch nor reads it as a chat.
        outputs = super().__call__([{"context": context_turns(c)} for c in contexts], **kwargs)
        return outputs[0] if single else outputs

    def _sanitize_parameters(self, return_knowledge: bool | None = None, knowledge_prompt: str | None = None, **generate_kwargs):
        forward = {"generate_kwargs": generate_kwargs}
        if return_knowledge is not None:
            forward["return_knowledge"] = return_knowledge
        if knowledge_prompt is not None:
            forward["knowledge_prompt"] = knowledge_prompt
        return {}, forward, {}

    def preprocess(self, inputs: dict) -> dict:
        turns = inputs["context"]
        encoded = self.processor.dialogue_batch([turns], with_knowledge=self.model.config.dialogue_with_knowledge)
        return {"model_inputs": encoded, "context": turns}

    def _forward(self, inputs: dict, generate_kwargs: dict | None = None, return_knowledge: bool = False, knowledge_prompt: str | None = None) -> dict:
        generate_kwargs = dict(generate_kwargs or {})
        tokenizer = self.processor.tokenizer
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
        model_inputs = inputs["model_inputs"]
        generated = self.model.generate(**model_inputs, **generate_kwargs)
        result = {"response": self.processor.decode_responses(generated, model_inputs["input_ids"].shape[1])[0]}
        if return_knowledge:
            result["knowledge"] = textualise_knowledge(
                self.model, self.processor, [inputs["context"]], prompt=knowledge_prompt, **generate_kwargs
            )[0]
        return result

    def postprocess(self, outputs: dict) -> dict:
        answer = {"generated_text": outputs["response"]}
        if "knowledge" in outputs:
            answer["knowledge"] = outputs["knowledge"]
        return answer


__all__ = ["VIKDFDialoguePipeline", "textualise_knowledge"]
