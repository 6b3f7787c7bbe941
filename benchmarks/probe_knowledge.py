"""What the distilled knowledge `K` encodes: linear probes and TIM retrieval on demo checkpoints.

    python benchmarks/probe_knowledge.py --world demo_output/world --tag seed0 \
        --checkpoints init=demo_output/no_pretrain_init pretrained=demo_output/pretrain vikdf=demo_output/vikdf

For each checkpoint, `K_T` of dialogue contexts (the CLIP text tower → IQ-Former path of inference):

- *transfer probe*: a linear classifier of the object's usual colour, fitted on `K_T` of validation contexts about
  the 18 dialogue objects and scored on the test contexts about the 6 image-only objects. This is the transfer
  dialogue fine-tuning needs: a read-out learnt on dialogue objects that also reads image-only ones. Chance 1/6.
- *CLIP transfer probe*: the same on the frozen CLIP text tower's pooled features (what is there before any
  IQ-Former).
- *TIM colour retrieval* (checkpoints with pre-training heads): how often the 5 held-out images nearest to a
  context's `K_T` in TIM space show the object's usual colour, per group of objects (≈ 0.2 when unrelated).

Writes `results/knowledge_probe_<tag>.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import _bench_common as common  # puts the repository root on sys.path
import torch

from vikdf.data.dialogue import load_dialogues  # noqa: E402
from vikdf.data.pairs import build_image_transform  # noqa: E402
from vikdf.data.synthetic import (  # noqa: E402
    COLOURS,
    OBJECT_KINDS,
    iter_shard_pairs,
    knowledge_table,
    mentioned_object,
)
from vikdf.evaluation import load_checkpoint  # noqa: E402

COLOUR_OF = knowledge_table()
IMAGE_ONLY = {kind.name for kind in OBJECT_KINDS if kind.image_only}


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


def colour_labels(contexts: list) -> torch.Tensor:
    return torch.tensor([list(COLOURS).index(COLOUR_OF[mentioned_object(context)]) for context in contexts])


@torch.no_grad()
def probe(checkpoint: Path, world: Path) -> dict:
    model, processor = load_checkpoint(checkpoint)
    model.eval()
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
        "k_transfer_probe": transfer_probe(valid_k.flatten(1), colour_labels(valid), test_k.flatten(1),
                                           colour_labels(test)),
        "clip_transfer_probe": transfer_probe(pooled(valid), colour_labels(valid), pooled(test), colour_labels(test)),
    }
    if model.vision_encoder is not None:
        shard = world / "pairs" / "heldout" / "00000.tar"
        pairs = list(iter_shard_pairs([shard]))
        with tarfile.open(shard) as tar:
            shown = {member.name[:-5]: json.loads(tar.extractfile(member).read())["attributes"]["colour"]
                     for member in tar.getmembers() if member.name.endswith(".json")}
        transform = build_image_transform(model.config.clip_config.vision_config.image_size, train=False)
        image_knowledge = model.get_image_knowledge(torch.stack([transform(image) for _, image, _ in pairs]))
        colours = [shown[key] for key, _, _ in pairs]
        for group, contexts, k in (("dialogue", valid, valid_k), ("image_only", test, test_k)):
            text, image = model.tim_embeddings(k, image_knowledge)
            similarity = text @ (image if image.dim() == 2 else image.amax(1)).T
            top = similarity.topk(5, dim=-1).indices.tolist()
            right = [sum(colours[j] == COLOUR_OF[mentioned_object(c)] for j in row) / 5
                     for c, row in zip(contexts, top)]
            result[f"tim_top5_right_colour_{group}"] = sum(right) / len(right)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="the demo's world folder (demo_output/world)")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="name=folder pairs")
    parser.add_argument("--tag", required=True, help="suffix of the result files")
    parser.add_argument("--note", default="", help="what the run was (written into the markdown)")
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results")
    args = parser.parse_args(argv)
    info = common.machine_info(torch.device("cpu"))
    results = {}
    for item in args.checkpoints:
        name, _, folder = item.partition("=")
        results[name] = probe(Path(folder), Path(args.world))
        print(name, results[name], flush=True)
    rows = [[name, *(f"{100 * r[key][1]:.0f} (fit {100 * r[key][0]:.0f})"
                     for key in ("k_transfer_probe", "clip_transfer_probe")),
             *(("–" if key not in r else f"{100 * r[key]:.0f}") for key in ("tim_top5_right_colour_dialogue",
                                                                            "tim_top5_right_colour_image_only"))]
            for name, r in results.items()]
    headers = ["checkpoint", "K_T probe → image-only (%)", "CLIP pooled probe → image-only (%)",
               "TIM top-5 right colour, dialogue objects (%)", "TIM top-5 right colour, image-only objects (%)"]
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
