"""What the distilled knowledge `K` encodes: linear probes and TIM retrieval on demo checkpoints.

    python experiments/probe_knowledge.py --world demo_output/world --tag seed0 \
        --checkpoints init=demo_output/no_pretrain_init pretrained=demo_output/pretrain vikdf=demo_output/vikdf

For each checkpoint, `K_T` of dialogue contexts (the CLIP text tower → IQ-Former path of inference):

- *transfer probe*: a linear classifier of the object's usual colour, fitted on `K_T` of validation contexts about
  the dialogue objects and scored on the test contexts about the image-only objects. This is the transfer
  dialogue fine-tuning needs: a read-out learnt on dialogue objects that also reads image-only ones. Chance 1/6.
- *CLIP transfer probe*: the same on the frozen CLIP text tower's pooled features (what is there before any
  IQ-Former).
- *TIM colour retrieval* (checkpoints with pre-training heads): how often the 5 held-out images nearest to a
  context's `K_T` in TIM space show the object's usual colour (`demo.LookRetrieval`, the pre-training criterion),
  on validation contexts about dialogue objects and on the held-out probe contexts about image-only objects
  (≈ 1/6 when unrelated).

Writes `results/knowledge_probe_<tag>.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _bench_common as common  # noqa: E402  (the machine record and result files; puts the repository root on sys.path)

import demo  # noqa: E402
from vikdf.data.dialogue import load_dialogues  # noqa: E402
from vikdf.demo.world import (  # noqa: E402
    COLOURS,
    knowledge_table,
    mentioned_object,
    read_object_kinds,
)
from vikdf.evaluation.dialogues import load_checkpoint  # noqa: E402


@torch.enable_grad()
def transfer_probe(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   steps: int = 300) -> tuple[float, float]:
    """(train accuracy, test accuracy) of an L2-regularised softmax probe on standardised features."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    torch.manual_seed(0)
    weight = torch.zeros(train.shape[1], len(COLOURS), requires_grad=True)
    bias = torch.zeros(len(COLOURS), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(train @ weight + bias, train_labels) + 1e-3 * weight.pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return tuple(((x @ weight + bias).argmax(-1) == y).float().mean().item()
                     for x, y in ((train, train_labels), (test, test_labels)))


def usual_colours(contexts: list, colour_of: dict[str, str]) -> list[str]:
    return [colour_of[mentioned_object(context, colour_of)] for context in contexts]


def colour_labels(contexts: list, colour_of: dict[str, str]) -> torch.Tensor:
    return torch.tensor([list(COLOURS).index(colour) for colour in usual_colours(contexts, colour_of)])


@torch.no_grad()
def probe(checkpoint: Path, world: Path) -> dict:
    model, processor = load_checkpoint(checkpoint)
    model.eval()
    kinds = read_object_kinds(world)
    colour_of = knowledge_table(kinds)
    valid = [list(d.context) for d in load_dialogues(world / "dialogue" / "reddit" / "valid.json")]
    test = [list(d.context) for d in load_dialogues(world / "dialogue" / "image_chat" / "test.json")]

    def knowledge(contexts):
        clip = processor.clip_text_inputs(contexts)
        return model.get_text_knowledge(clip["clip_input_ids"], clip["clip_attention_mask"])

    def pooled(contexts):
        clip = processor.clip_text_inputs(contexts)
        states = model.text_encoder(input_ids=clip["clip_input_ids"], attention_mask=clip["clip_attention_mask"])
        return states.pooler_output

    valid_k, test_k = knowledge(valid), knowledge(test)
    result = {
        "k_transfer_probe": transfer_probe(valid_k.flatten(1), colour_labels(valid, colour_of), test_k.flatten(1),
                                           colour_labels(test, colour_of)),
        "clip_transfer_probe": transfer_probe(pooled(valid), colour_labels(valid, colour_of), pooled(test),
                                              colour_labels(test, colour_of)),
    }
    if model.vision_encoder is not None:
        probe_contexts = [list(d.context) for d in load_dialogues(world / "dialogue" / "probe" / "image_only.json")]
        # The same names as a caption would write them: the gap to the dialogue contexts is the part of the look
        # that pre-training learnt from captions but that a dialogue turn around the name does not reach.
        caption_form = [[f"a {kind.name}."] for kind in kinds if kind.image_only]
        for group, contexts in (("dialogue", valid), ("image_only", probe_contexts),
                                ("image_only_caption_form", caption_form)):
            retrieval = demo.LookRetrieval(world / "pairs" / "heldout" / "00000.tar", contexts, colour_of, processor,
                                           model.config.clip_config.vision_config.image_size)
            result[f"tim_top5_right_colour_{group}"] = retrieval(model)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="the demo's world folder (demo_output/world)")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="name=folder pairs")
    parser.add_argument("--tag", required=True, help="suffix of the result files")
    parser.add_argument("--note", default="", help="what the run was (written into the markdown)")
    parser.add_argument("--output_dir", default=Path(__file__).resolve().parent / "results", type=Path)
    args = parser.parse_args(argv)
    info = common.machine_info(torch.device("cpu"))
    results = {}
    for item in args.checkpoints:
        name, _, folder = item.partition("=")
        results[name] = probe(Path(folder), Path(args.world))
        print(name, results[name], flush=True)
    retrievals = [f"tim_top5_right_colour_{group}" for group in ("dialogue", "image_only", "image_only_caption_form")]
    rows = [[name, *(f"{100 * r[key][1]:.0f} (fit {100 * r[key][0]:.0f})"
                     for key in ("k_transfer_probe", "clip_transfer_probe")),
             *(("–" if key not in r else f"{100 * r[key]:.0f}") for key in retrievals)]
            for name, r in results.items()]
    headers = ["checkpoint", "K_T probe → image-only (%)", "CLIP pooled probe → image-only (%)",
               "TIM top-5 right colour, dialogue objects (%)", "TIM top-5 right colour, image-only objects (%)",
               "the same, image-only names as captions (\"a NAME.\") (%)"]
    markdown = "\n".join([f"# What K encodes — {args.tag}", "", *common.machine_lines(info), "", args.note, "",
                          common.markdown_table(headers, rows), "",
                          "Probes are fitted on validation contexts about dialogue objects (fit accuracy in brackets) "
                          "and scored on test contexts about image-only objects; chance 17 %."]) + "\n"
    print(markdown)
    payload = {"machine": info, "note": args.note, "results": results}
    common.write_results(f"knowledge_probe_{args.tag}", markdown, payload, args.output_dir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
