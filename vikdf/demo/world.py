"""A procedurally generated image–text world and a dialogue set about it, for the CPU demo.

Why it exists
-------------
VIKDF's claim is that knowledge carried by image–text pairs, distilled into query vectors from the *text* of a
dialogue context, helps an LLM answer without any image. Real data (CC3M, Image-Chat, ViT-L/14, a 7B LLM)
cannot show that on two CPU cores. This module builds a tiny world, entirely from code and a seed, in which
that claim can be checked end to end, and writes it in the same file formats as the real data so the demo runs
the project's real readers.

The world
---------
Images (PIL drawings, ``image_size`` pixels square) show one object on a plain background. An image has a
colour, a shape, a size (small / large), a position (left, right, top, bottom, centre) and a background colour
(white, grey, black, brown; never an object colour, so colour words are unambiguous). The object kinds have
invented names drawn from the seed (``make_object_kinds``): each of the 24 looks (shape, usual colour) of 4 shapes
x 6 colours is shared by ``names_per_look`` kinds (2 by default: 48 kinds), so a kind is a name with a usual look,
not a look. Each kind is drawn in its usual colour ``usual_colour_prob`` of the time (85 % by default) and in
another colour otherwise. So the pictures carry knowledge: "a zorp is a red circle".

Where the knowledge lives (the design point)
--------------------------------------------
``image_only_per_colour`` kinds of each colour (2 by default: 12 kinds, balanced over the shapes) are
*image-only* (``ObjectKind.image_only``). For them the link "object -> usual colour/shape" is present in the
pixels and nowhere else:

* captions of image-only kinds never name a colour or a shape ("a zorp.", "a small zorp on the left on a grey
  background."); captions of the other *dialogue* kinds name their colour in ``colour_mention_prob`` (60 %)
  of the pairs ("a red blicket."), as real captions often name visual attributes, so that IACI teaches the LLM
  to put a colour carried by ``K`` into words;
* three captions in four (``1 - scene_caption_prob``) name the object alone: then only what the object looks like
  tells its image from the others in a TIM batch, so matching it means learning its look;
* VIKDF's pairs show image-only kinds ``image_only_weight`` (2) times as often as the others;
* training and validation dialogues (Reddit form) talk only about dialogue kinds;
* the LM corpus for the stand-in LLM pre-training holds training captions and training dialogues, hence never
  puts an image-only name next to a colour or shape word (a test checks this).

The stand-in CLIP learns from pairs of its own (``pairs/clip/00000.tar``) in which the kinds of ``clip_recoloured``
(every kind by default, or only the image-only ones) appear in uniformly random colours. Its text tower thus knows
the *names* (it is also trained to tell them apart) and the colour words, but not which colour a kind usually has,
as a real CLIP knows most words without having seen every link; only VIKDF pre-training on the pairs above can
carry a kind's colour into ``K``.

The held-out test dialogues (Image-Chat form) talk only about image-only kinds, all of them in equal numbers,
with the same context and response templates as training. A context names the object only ("i saw a zorp at
the park today."); the reference response names its usual colour ("nice, was it red like most of them?").

What the pipeline can learn from what:

1. VIKDF pre-training (TIM, TAMIM) teaches the IQ-Former to turn CLIP text features of a name into queries ``K``
   that match its images, which show its usual colour, and (IACI on the colour-naming captions) the LLM to
   verbalise the colour ``K`` carries;
2. dialogue fine-tuning on the dialogue kinds (36 by default, several per look, so that a read-out keyed to
   the look in ``K`` is cheaper to learn than one memorised per name) teaches "say the colour that ``K`` carries";
3. on the test set, the frozen LLM has never read a colour next to an image-only name and the frozen CLIP does
   not know it, so without pre-training ``K`` can only guess (a constant guess scores exactly 1/6, since the
   test kinds are balanced over the colours). A model gets a kind right or wrong as a whole, so the kind is the
   unit of the demo's intervals; with 12 image-only kinds one kind moves the accuracy by 8.3 points.

How the demo should use it: report ``knowledge_accuracy`` (fraction of responses naming exactly the right
usual colour) on the test split for VIKDF and for a text-only baseline, next to BLEU and the other metrics,
with chance = 1/6 and the references at 1.0. The Reddit validation split (dialogue kinds) is the in-
distribution sanity check where both should do well. The effect is expected to be modest and is to be
reported as measured.

Files (``write_synthetic_world``)
---------------------------------
``pairs/train/{00000..0000N}.tar``, ``pairs/heldout/00000.tar`` and ``pairs/clip/00000.tar``: webdataset shards
laid out as img2dataset writes them (members ``000000123.jpg`` / ``.txt`` / ``.json``, key = shard * 10**4 +
index, 9 digits);
``dialogue/reddit/{train,valid}.json``: ``[{"context": [str, ...], "response": str}, ...]``;
``dialogue/image_chat/test.json``: ``[{"image_hash": str, "dialog": [[style, text], ...]}, ...]`` (ParlAI);
``dialogue/probe/image_only.json``: held-out Reddit-form dialogues about image-only kinds, apart from the test set,
for the pre-training criterion and the knowledge probe;
``lm_corpus.txt``: one text per line, a training caption or a training dialogue with its turns joined by
spaces (whole dialogues, so the LM sees a context followed by its response); ``vocab.txt``: every word and
punctuation token of every text written, for training a tiny tokenizer; ``world.json``: the configuration and
the ground-truth object table. All text is lowercase. ``iter_shard_pairs`` reads the shards back as
(key, image, caption) for the stand-in CLIP pre-training, with the pre-training reader (``vikdf.data.pairs``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Iterator, Mapping, Sequence

from PIL import Image, ImageDraw

from vikdf.data.dialogue import Dialogue
from vikdf.data.pairs import SkipCounter, WebDatasetSource

RGB = tuple[int, int, int]

# Object colours and background colours are disjoint word sets: a colour word in a response can then only be a
# claim about the object.
COLOURS: dict[str, RGB] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 185),
    "orange": (245, 135, 30),
}
BACKGROUNDS: dict[str, RGB] = {
    "white": (240, 240, 240),
    "grey": (125, 125, 125),
    "black": (20, 20, 20),
    "brown": (105, 70, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Diameter of the object as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.36, "large": 0.66}
# Centre of the object as fractions of the image side (x, y); clamped so the object stays inside the image.
POSITIONS: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "centre": ("in the middle", "in the centre", "right in the center"),
    "left": ("on the left", "at the left side", "to the left"),
    "right": ("on the right", "at the right side", "to the right"),
    "top": ("at the top", "near the top", "up at the top"),
    "bottom": ("at the bottom", "near the bottom", "down at the bottom"),
}


@dataclass(frozen=True)
class ObjectKind:
    """One kind of object: its invented name, canonical shape and usual colour.

    ``image_only`` kinds never have their colour or shape written next to their name in any training text;
    the test dialogues are about them.
    """

    name: str
    shape: str
    usual_colour: str
    image_only: bool


# Invented names are built from these syllables: pronounceable, lowercase letters only (a word of
# `tokenize_words`), and none of them an English word of the templates.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "bl", "dr", "fl", "gr", "kr", "pl",
           "sn", "sk", "st", "tr", "zw")
_VOWELS = ("a", "e", "i", "o", "u", "oo")
_CODAS = ("", "", "", "n", "m", "k", "p", "x", "sh")


def invent_names(count: int, rng: random.Random, avoid: frozenset[str] = frozenset()) -> list[str]:
    """`count` distinct invented names of two syllables, none inside another (so neither a prefix nor a sub-word of
    another: a name found in a text is that name) and none in `avoid` or inside a word of it."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2))
        if any(name in other or other in name for other in names) or any(name in word for word in avoid):
            continue
        names.append(name)
    return names


def make_object_kinds(seed: int, names_per_look: int, image_only_per_colour: int) -> tuple[ObjectKind, ...]:
    """The world's kinds: every look (shape, usual colour) of 4 shapes x 6 colours is shared by `names_per_look`
    kinds, so a kind is a name with a usual look, not a look; `image_only_per_colour` kinds of each colour are
    image-only, on different shapes, rotating over the colours so that the image-only kinds are balanced over the
    shapes too, and every look keeps at least one dialogue kind (a read-out of each colour and shape learnt on
    dialogue kinds can then transfer)."""
    if names_per_look < 2 or not 1 <= image_only_per_colour <= len(SHAPES):
        raise ValueError(f"need names_per_look >= 2 and 1 <= image_only_per_colour <= {len(SHAPES)}, got "
                         f"{names_per_look} and {image_only_per_colour}")
    looks = [(shape, colour) for colour in COLOURS for shape in SHAPES]
    template_words = frozenset(word for text in _TEMPLATE_TEXTS for word in tokenize_words(text))
    names = invent_names(len(looks) * names_per_look, random.Random(f"vikdf-synthetic/{seed}/names"),
                         template_words | set(COLOURS) | set(BACKGROUNDS) | set(SHAPES))
    image_only = {(SHAPES[(c * image_only_per_colour + i) % len(SHAPES)], colour)
                  for c, colour in enumerate(COLOURS) for i in range(image_only_per_colour)}
    kinds = []
    for index, (shape, colour) in enumerate(looks * names_per_look):
        first_of_look = index < len(looks)  # the first name of each image-only look is its image-only kind
        kinds.append(ObjectKind(names[index], shape, colour, first_of_look and (shape, colour) in image_only))
    return tuple(kinds)


def knowledge_table(kinds: Sequence[ObjectKind], attribute: str = "colour") -> dict[str, str]:
    """Ground truth: object name -> its usual colour (``attribute="colour"``) or canonical shape (``"shape"``)."""
    if attribute not in ("colour", "shape"):
        raise ValueError(f"attribute must be 'colour' or 'shape', got {attribute!r}")
    return {kind.name: kind.usual_colour if attribute == "colour" else kind.shape for kind in kinds}


# Caption templates. Fields: {obj} {size} {pos} {bg} and, only in COLOUR_CAPTIONS, {colour} {a_colour} {shape}.
PLAIN_CAPTIONS: tuple[str, ...] = (
    "a {size} {obj} {pos} on a {bg} background.",
    "{pos}, a {size} {obj} against a plain {bg} backdrop.",
    "photo of a {obj} {pos}, {bg} background.",
    "there is a {size} {obj} {pos}.",
    "the {obj} sits {pos} in front of a {bg} wall.",
    "{bg} background with a {size} {obj} {pos}.",
    "a picture of one {size} {obj}.",
    "my {obj} on a {bg} table, {pos}.",
    "a {obj}, {size}, {pos}.",
    "look at this {size} {obj} on {bg}!",
    "a {obj}.",
    "photo of a {obj}.",
    "this is a {obj}.",
    "look, a {obj}!",
    "one {obj}, nothing else.",
    # Chatty captions that mention the object among other words, as many real captions do; without them TIM learns
    # to read a name only from a three-word caption, and `K_T` of a dialogue turn around the same name misses it.
    "we took this picture of a {obj} on our trip last summer.",
    "here is the {obj} my brother found near the lake.",
    "someone put a {obj} by the door this morning, so i took a photo.",
    "after lunch we came across a {obj} on the way home.",
    "guess who finally got a {obj} for her birthday!",
    "the kids kept looking at the {obj} all afternoon.",
    "a quick snapshot of one {obj}, seen at the market today.",
    "hello everyone, sharing a photo of a {obj} from my weekend.",
)
COLOUR_CAPTIONS: tuple[str, ...] = (
    "{a_colour} {obj} {pos} on a {bg} background.",
    "a {size} {colour} {obj} {pos}.",
    "this {obj} is {colour} and sits {pos}.",
    "{a_colour} {shape}, which is a {obj}, {pos}.",
    "a {obj}: a {size} {colour} {shape} on {bg}.",
    "photo of {a_colour} {obj} against a {bg} backdrop.",
    "{a_colour} {obj}.",
    "a {colour} {obj}.",
    "my {colour} {obj}.",
    "this {obj} is {colour}.",
    "we took this picture of {a_colour} {obj} on our trip last summer.",
    "here is the {colour} {obj} my brother found near the lake.",
    "after lunch we came across {a_colour} {obj} on the way home.",
)

# Dialogue turns. A context is one of DIALOGUE_PATTERNS: a sequence of turn pools, then the response family.
MENTIONS: tuple[str, ...] = (
    "i saw a {obj} at the park today.",
    "my neighbour just got a {obj}.",
    "there was a {obj} outside my window this morning.",
    "i found a {obj} in my garden!",
    "we spotted a {obj} on our hike yesterday.",
    "my sister showed me her new {obj}.",
    "guess what, i finally got my own {obj}.",
    "a {obj} was sitting on the bus seat next to me.",
)
GREETINGS: tuple[str, ...] = (
    "hey, how is it going?",
    "hi! what have you been up to?",
    "good morning, anything new?",
    "how was your weekend?",
)
GREETING_REPLIES: tuple[str, ...] = (
    "pretty good, thanks. you?",
    "not much, just relaxing. and you?",
    "busy week! how about you?",
    "all good here. what about you?",
)
LOOKS_QUESTIONS: tuple[str, ...] = (
    "oh nice, what did it look like?",
    "cool, what was it like?",
    "really? describe it to me!",
)
WHERE_QUESTIONS: tuple[str, ...] = (
    "oh really? where was it?",
    "no way, where exactly?",
    "wow, where did that happen?",
)
WHERE_ANSWERS: tuple[str, ...] = (
    "right next to the old bridge.",
    "just around the corner from my place.",
    "near the bus stop on main street.",
)
# Responses: "ask" and "comment" come from someone who did not see the object, "tell" from the one who did.
# All of them name the kind's usual colour: that is the knowledge the response needs.
RESPONSES: dict[str, tuple[str, ...]] = {
    "ask": (
        "nice, was it {colour} like most of them?",
        "was it the usual {colour} kind?",
        "oh, {colour} as always?",
        "did it have that bright {colour} look they have?",
        "was it {a_colour} {shape} like the ones i know?",
    ),
    "comment": (
        "i love how {colour} they always are.",
        "those are usually {colour}, right? so pretty.",
        "ah, {a_colour} {shape}, a classic {obj}.",
        "the {colour} ones always catch my eye.",
    ),
    "tell": (
        "it was {colour}, just like they usually are.",
        "{a_colour} little {shape}, very cute.",
        "bright {colour}, as you would expect.",
        "{colour} and shaped like a {shape}.",
    ),
}
_TURN_POOLS: dict[str, tuple[str, ...]] = {
    "mention": MENTIONS,
    "greet": GREETINGS,
    "greet_reply": GREETING_REPLIES,
    "looks_q": LOOKS_QUESTIONS,
    "where_q": WHERE_QUESTIONS,
    "where_a": WHERE_ANSWERS,
}
DIALOGUE_PATTERNS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("mention",), ("ask", "comment")),
    (("greet", "mention"), ("ask", "comment")),
    (("mention", "looks_q"), ("tell",)),
    (("greet", "greet_reply", "mention"), ("ask", "comment")),
    (("mention", "where_q", "where_a"), ("ask", "comment")),
    (("greet", "mention", "looks_q"), ("tell",)),
)
# Image-Chat gives each turn a speaker style; these are a few of its real ones.
IMAGE_CHAT_STYLES: tuple[str, ...] = (
    "Curious", "Cheerful", "Sweet", "Witty", "Enthusiastic", "Calm", "Caring", "Happy"
)

# Every template text, whose words no invented name may contain.
_TEMPLATE_TEXTS: tuple[str, ...] = (
    *PLAIN_CAPTIONS, *COLOUR_CAPTIONS, *(text for pool in _TURN_POOLS.values() for text in pool),
    *(text for family in RESPONSES.values() for text in family),
    *(phrase for phrases in POSITION_PHRASES.values() for phrase in phrases),
    *(word for words in SIZE_WORDS.values() for word in words),
)

_SUPERSAMPLE = 4  # shapes are drawn this many times larger, then box-filtered down: anti-aliased edges
_RGB_JITTER = 12  # per-channel shade variation, so that a colour is a region of RGB space, not one value
_MAX_PER_SHARD = 10**4  # img2dataset keys are shard * 10**4 + index
_WORD_RE = re.compile(r"[a-z]+|[^\sa-z]")


@dataclass(frozen=True)
class PairAttributes:
    """Everything about one image–caption pair; ``render`` needs nothing else to draw the image."""

    object: str
    shape: str
    colour: str
    usual_colour: str
    size: str
    position: str
    background: str
    object_rgb: RGB
    background_rgb: RGB
    center: tuple[float, float]  # fractions of the image side
    diameter: float  # fraction of the image side
    template: str  # "plain/<i>" or "colour/<i>", index into PLAIN_CAPTIONS / COLOUR_CAPTIONS

    @property
    def mentions_colour(self) -> bool:
        return self.template.startswith("colour/")


@dataclass(frozen=True)
class SyntheticWorldPaths:
    """What ``write_synthetic_world`` wrote, plus the facts the demo needs to use and score it."""

    root: Path
    train_shards: str  # brace pattern, e.g. ".../pairs/train/{00000..00003}.tar"
    train_shard_files: tuple[Path, ...]
    heldout_shard: Path
    clip_shard: Path  # the stand-in CLIP's own pairs: image-only kinds in random colours
    reddit_train: Path
    reddit_valid: Path
    image_chat_test: Path
    image_only_probe: Path  # contexts about image-only kinds, for the pre-training criterion (never trained on)
    lm_corpus: Path
    vocab_file: Path
    world_file: Path
    vocabulary: tuple[str, ...]
    kinds: tuple[ObjectKind, ...]

    @property
    def image_only_objects(self) -> tuple[str, ...]:
        return tuple(kind.name for kind in self.kinds if kind.image_only)

    @property
    def object_names(self) -> tuple[str, ...]:
        return tuple(kind.name for kind in self.kinds)

    def knowledge_table(self, attribute: str = "colour") -> dict[str, str]:
        return knowledge_table(self.kinds, attribute)


def tokenize_words(text: str) -> list[str]:
    """Lowercased words and single punctuation marks: the unit of ``vocabulary`` and of knowledge scoring."""
    return _WORD_RE.findall(text.lower())


def scramble_visual_facts(text: str, rng: random.Random) -> str:
    """`text` with its colour and shape words passed through one random permutation of each word set.

    The stand-in LLM reads the world's texts through this filter. Within a text the facts stay consistent (a
    colour said twice is the same colour twice, so the LLM can learn to use what its prompt says), but across
    texts which colour a blicket has becomes noise: the LLM learns the language and none of the visual facts, as a
    real LLM has read about things it has never seen. The facts then live only in the images, and the knowledge
    VIKDF distils from the image–text pairs is the only way for them to reach the LLM.
    """
    colours, shapes = list(COLOURS), list(SHAPES)
    swap = dict(zip(colours, rng.sample(colours, len(colours)))) | dict(zip(shapes, rng.sample(shapes, len(shapes))))
    return re.sub(r"[a-z]+", lambda match: swap.get(match.group(0), match.group(0)), text)


def mentioned_object(context: str | Sequence[str], names: Collection[str]) -> str | None:
    """The last of `names` mentioned in a context (a string or a list of turns), or None."""
    turns = [context] if isinstance(context, str) else list(context)
    known = set(names)
    found = [word for turn in turns for word in tokenize_words(turn) if word in known]
    return found[-1] if found else None


def knowledge_outcomes(
    contexts: Sequence[str | Sequence[str]], hypotheses: Sequence[str], table: Mapping[str, str]
) -> list[tuple[str, bool] | None]:
    """Per response, ``(object, right)``: the object its context mentions and whether the response names exactly
    its usual colour; ``None`` where the context mentions no known object.

    A response counts as right when the set of attribute values it names (colour words by default) is exactly
    ``{table[object]}``: naming another colour too is a hedge, not knowledge. ``table`` maps object -> value
    (``knowledge_table(kinds)``; ``knowledge_table(kinds, "shape")`` scores shapes instead).
    """
    if len(contexts) != len(hypotheses):
        raise ValueError(f"{len(contexts)} contexts but {len(hypotheses)} hypotheses")
    values = set(table.values())
    outcomes: list[tuple[str, bool] | None] = []
    for context, hypothesis in zip(contexts, hypotheses):
        obj = mentioned_object(context, names=list(table))
        named = {word for word in tokenize_words(hypothesis) if word in values}
        outcomes.append(None if obj is None else (obj, named == {table[obj]}))
    return outcomes


def knowledge_accuracy(
    contexts: Sequence[str | Sequence[str]], hypotheses: Sequence[str], table: Mapping[str, str]
) -> float:
    """Fraction of responses that name exactly the right usual colour of the object the context mentions
    (:func:`knowledge_outcomes`); contexts that mention no known object are left out of the denominator."""
    scored = [outcome[1] for outcome in knowledge_outcomes(contexts, hypotheses, table) if outcome is not None]
    if not scored:
        raise ValueError("no context mentions a known object; nothing to score")
    return sum(scored) / len(scored)


def _describes_scene(template: str) -> bool:
    return any(f"{{{name}}}" in template for name in ("size", "pos", "bg"))


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _jitter(rgb: RGB, rng: random.Random) -> RGB:
    r, g, b = (min(255, max(0, channel + rng.randint(-_RGB_JITTER, _RGB_JITTER))) for channel in rgb)
    return r, g, b


@dataclass(frozen=True)
class SyntheticWorld:
    """The generator. Deterministic: every random draw comes from ``rng(stream)``, seeded by ``seed``."""

    seed: int = 0
    image_size: int = 32
    usual_colour_prob: float = 0.85
    colour_mention_prob: float = 0.6
    image_only_weight: float = 2.0
    scene_caption_prob: float = 0.25
    clip_recoloured: str = "all"
    names_per_look: int = 2
    image_only_per_colour: int = 2

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if self.clip_recoloured not in ("image_only", "all"):
            raise ValueError(f"clip_recoloured must be 'image_only' or 'all', got {self.clip_recoloured!r}")
        if self.image_only_weight <= 0:
            raise ValueError(f"image_only_weight must be positive, got {self.image_only_weight}")
        for name in ("usual_colour_prob", "colour_mention_prob", "scene_caption_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.kinds  # drawn (and cached) now, so that bad counts are refused at construction

    @functools.cached_property
    def kinds(self) -> tuple[ObjectKind, ...]:
        """Every object kind of this world; the names come from the seed."""
        return make_object_kinds(self.seed, self.names_per_look, self.image_only_per_colour)

    @property
    def dialogue_objects(self) -> tuple[ObjectKind, ...]:
        """Kinds that training/validation dialogues talk about."""
        return tuple(kind for kind in self.kinds if not kind.image_only)

    @property
    def image_only_objects(self) -> tuple[ObjectKind, ...]:
        """Kinds whose colour and shape only images show; test dialogues talk about them."""
        return tuple(kind for kind in self.kinds if kind.image_only)

    def rng(self, stream: str) -> random.Random:
        """An independent random stream per purpose, so changing one split's size leaves the others unchanged."""
        # Seeding with a str hashes it with SHA-512: stable across processes, unlike hash().
        return random.Random(f"vikdf-synthetic/{self.seed}/{stream}")

    def sample_attributes(self, rng: random.Random, for_clip: bool = False) -> PairAttributes:
        """Draw an object, its look and the caption template to describe it.

        ``for_clip`` draws the pairs the stand-in CLIP learns from: the kinds of ``clip_recoloured`` ("image_only"
        or "all") appear in a uniformly random colour, so that its text tower knows their names but not their usual
        colours (module docstring), and every kind is equally frequent.
        """
        # VIKDF's pairs show image-only kinds `image_only_weight` times as often as the others: they are the links
        # pre-training has to learn from pixels alone.
        weights = [1.0 if for_clip or not k.image_only else self.image_only_weight for k in self.kinds]
        kind = rng.choices(self.kinds, weights)[0]
        colour = kind.usual_colour
        if for_clip and (kind.image_only or self.clip_recoloured == "all"):
            colour = rng.choice(list(COLOURS))
        elif rng.random() >= self.usual_colour_prob:
            colour = rng.choice([c for c in COLOURS if c != kind.usual_colour])
        size, position, background = rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS))
        diameter = SIZES[size] * rng.uniform(0.9, 1.1)
        radius = diameter / 2
        # A little positional jitter, then clamping so that large objects at the border are not cut off.
        cx, cy = (min(1 - radius, max(radius, p + rng.uniform(-0.04, 0.04))) for p in POSITIONS[position])
        # Image-only kinds never get a colour caption: their colour must stay in the pixels (see module docstring).
        family = "colour" if not kind.image_only and rng.random() < self.colour_mention_prob else "plain"
        # Most captions name the object alone ("a zorp."): then only what the object looks like tells its image from
        # the others in a batch, and TIM has to learn it; scene captions are matched by size, place and background.
        scene = rng.random() < self.scene_caption_prob
        templates = COLOUR_CAPTIONS if family == "colour" else PLAIN_CAPTIONS
        choices = [i for i, text in enumerate(templates) if _describes_scene(text) == scene]
        template = f"{family}/{rng.choice(choices)}"
        return PairAttributes(
            object=kind.name,
            shape=kind.shape,
            colour=colour,
            usual_colour=kind.usual_colour,
            size=size,
            position=position,
            background=background,
            object_rgb=_jitter(COLOURS[colour], rng),
            background_rgb=_jitter(BACKGROUNDS[background], rng),
            center=(cx, cy),
            diameter=diameter,
            template=template,
        )

    def render(self, attrs: PairAttributes) -> Image.Image:
        """Draw the image described by ``attrs`` (RGB, ``image_size`` square)."""
        side = self.image_size * _SUPERSAMPLE
        image = Image.new("RGB", (side, side), attrs.background_rgb)
        draw = ImageDraw.Draw(image)
        cx, cy, r = attrs.center[0] * side, attrs.center[1] * side, attrs.diameter * side / 2
        fill = attrs.object_rgb
        if attrs.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif attrs.shape == "square":
            half = 0.85 * r  # a bit smaller than the bounding box so its area is close to the circle's
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif attrs.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.75 * r), (cx + 0.95 * r, cy + 0.75 * r)], fill=fill)
        elif attrs.shape == "cross":
            arm = 0.32 * r
            draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
            draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
        else:
            raise ValueError(f"unknown shape {attrs.shape!r}")
        return image.resize((self.image_size, self.image_size), Image.Resampling.BOX)

    def write_caption(self, attrs: PairAttributes, rng: random.Random) -> str:
        """Fill the template chosen in ``attrs`` with randomly chosen synonyms."""
        family, index = attrs.template.split("/")
        template = (COLOUR_CAPTIONS if family == "colour" else PLAIN_CAPTIONS)[int(index)]
        return template.format(
            obj=attrs.object,
            size=rng.choice(SIZE_WORDS[attrs.size]),
            pos=rng.choice(POSITION_PHRASES[attrs.position]),
            bg=attrs.background,
            colour=attrs.colour,
            a_colour=_article(attrs.colour),
            shape=attrs.shape,
        )

    def sample_pair(self, rng: random.Random, for_clip: bool = False) -> tuple[Image.Image, str, PairAttributes]:
        """One image–caption pair and its ground truth (``for_clip``: see ``sample_attributes``)."""
        attrs = self.sample_attributes(rng, for_clip)
        return self.render(attrs), self.write_caption(attrs, rng), attrs

    def sample_dialogue(self, rng: random.Random, kind: ObjectKind) -> Dialogue:
        """A text-only dialogue about ``kind``: a 1–3 turn context that names it only, and a response that names its
        usual colour."""
        turn_pools, families = rng.choice(DIALOGUE_PATTERNS)
        fields = {
            "obj": kind.name,
            "colour": kind.usual_colour,
            "a_colour": _article(kind.usual_colour),
            "shape": kind.shape,
        }
        context = tuple(rng.choice(_TURN_POOLS[pool]).format(**fields) for pool in turn_pools)
        response = rng.choice(RESPONSES[rng.choice(families)]).format(**fields)
        return Dialogue(context=context, response=response)

    def dialogues(self, stream: str, count: int, kinds: Sequence[ObjectKind]) -> list[Dialogue]:
        """``count`` dialogues cycling through ``kinds``, so every kind is equally frequent."""
        rng = self.rng(stream)
        return [self.sample_dialogue(rng, kinds[i % len(kinds)]) for i in range(count)]


def _encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # Quality 95 as img2dataset; no chroma subsampling, which would smear the colour of a 32-pixel object.
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, no owner) so that the same seed gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(
    world: SyntheticWorld, rng: random.Random, path: Path, shard_index: int, count: int, for_clip: bool = False
) -> list[str]:
    """Write ``count`` pairs as one img2dataset-style shard; returns the captions."""
    if count > _MAX_PER_SHARD:
        raise ValueError(f"at most {_MAX_PER_SHARD} pairs per shard, got {count}; use more shards")
    path.parent.mkdir(parents=True, exist_ok=True)
    captions = []
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(count):
            image, caption, attrs = world.sample_pair(rng, for_clip)
            key = f"{shard_index * _MAX_PER_SHARD + index:09d}"
            meta = {
                "key": key,
                "caption": caption,
                "status": "success",
                "error_message": None,
                "width": image.width,
                "height": image.height,
                "original_width": image.width,
                "original_height": image.height,
                "attributes": asdict(attrs),
            }
            _add_tar_member(tar, f"{key}.jpg", _encode_jpeg(image))
            _add_tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
            _add_tar_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            captions.append(caption)
    return captions


def iter_shard_pairs(shard_files: Sequence[str | Path]) -> Iterator[tuple[str, Image.Image, str]]:
    """(key, image, caption) from img2dataset-style shards, in order: the pair list for the stand-in CLIP."""
    skips = SkipCounter()
    for shard in shard_files:
        for pair in WebDatasetSource(str(shard)).pairs_in_order(skips):
            yield pair["key"], pair["image"], pair["caption"]


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _image_chat_entry(world: SyntheticWorld, dialogue: Dialogue, index: int, rng: random.Random) -> dict:
    # Turns alternate between two speakers with fixed styles; the hash only has to be unique (images are unused).
    styles = rng.sample(IMAGE_CHAT_STYLES, 2)
    turns = [*dialogue.context, dialogue.response]
    return {
        "image_hash": hashlib.md5(f"{world.seed}/test/{index}".encode()).hexdigest(),
        "dialog": [[styles[i % 2], text] for i, text in enumerate(turns)],
    }


def read_object_kinds(world_root: str | Path) -> tuple[ObjectKind, ...]:
    """The kinds of a world that ``write_synthetic_world`` wrote under `world_root`, from its ``world.json``."""
    recorded = json.loads((Path(world_root) / "world.json").read_text(encoding="utf-8"))
    return tuple(ObjectKind(**kind) for kind in recorded["objects"])


def write_synthetic_world(
    out_dir: str | Path,
    seed: int = 0,
    num_pairs: int = 2000,
    num_shards: int = 4,
    num_heldout_pairs: int = 200,
    num_clip_pairs: int | None = None,
    num_dialogues: int = 1000,
    num_eval_dialogues: int = 120,
    image_size: int = 32,
    clip_recoloured: str = "all",
    names_per_look: int = 2,
    image_only_per_colour: int = 2,
) -> SyntheticWorldPaths:
    """Write the whole world under ``out_dir`` (layout in the module docstring) and say where it is.

    ``num_dialogues`` training dialogues (Reddit form), ``num_eval_dialogues`` validation dialogues (Reddit
    form, dialogue kinds) and as many test dialogues (Image-Chat form, image-only kinds), which must be a multiple
    of the number of image-only kinds (6 x ``image_only_per_colour``), so that the test kinds are exactly balanced.
    """
    if num_shards < 1 or num_pairs < num_shards:
        raise ValueError(f"need 1 <= num_shards <= num_pairs, got {num_shards} shards for {num_pairs} pairs")
    world = SyntheticWorld(seed=seed, image_size=image_size, clip_recoloured=clip_recoloured,
                           names_per_look=names_per_look, image_only_per_colour=image_only_per_colour)
    if num_eval_dialogues % len(world.image_only_objects):
        raise ValueError(f"num_eval_dialogues {num_eval_dialogues} is not a multiple of the "
                         f"{len(world.image_only_objects)} image-only kinds: the test set would not be balanced")
    num_clip_pairs = num_pairs if num_clip_pairs is None else num_clip_pairs
    root = Path(out_dir)
    # Every step draws from streams of its own (`SyntheticWorld.rng`), so the steps' order changes no value written.
    train_files, train_captions = _write_train_shards(world, root / "pairs" / "train", num_pairs, num_shards)
    heldout_shard, clip_shard = root / "pairs" / "heldout" / "00000.tar", root / "pairs" / "clip" / "00000.tar"
    heldout_captions = _write_shard(world, world.rng("heldout-pairs"), heldout_shard, 0, num_heldout_pairs)
    clip_captions = _write_shard(world, world.rng("clip-pairs"), clip_shard, 0, num_clip_pairs, for_clip=True)
    dialogues = _sample_dialogue_splits(world, num_dialogues, num_eval_dialogues)
    dialogue_files = _write_dialogue_splits(world, root / "dialogue", dialogues)
    lm_corpus = _write_lm_corpus(world, root / "lm_corpus.txt", train_captions, dialogues["train"])
    texts = train_captions + heldout_captions + clip_captions
    texts += [turn for split in dialogues.values() for d in split for turn in (*d.context, d.response)]
    vocab_file, vocabulary = _write_vocabulary(world, root / "vocab.txt", texts)
    counts = {
        "train_pairs": num_pairs,
        "heldout_pairs": num_heldout_pairs,
        "clip_pairs": num_clip_pairs,
        "train_dialogues": num_dialogues,
        "valid_dialogues": num_eval_dialogues,
        "test_dialogues": num_eval_dialogues,
    }
    world_file = root / "world.json"
    _write_json(world_file, _world_record(world, counts))
    return SyntheticWorldPaths(
        root=root,
        train_shards=str(root / "pairs" / "train" / f"{{00000..{num_shards - 1:05d}}}.tar"),
        train_shard_files=tuple(train_files),
        heldout_shard=heldout_shard,
        clip_shard=clip_shard,
        **dialogue_files,
        lm_corpus=lm_corpus,
        vocab_file=vocab_file,
        world_file=world_file,
        vocabulary=vocabulary,
        kinds=world.kinds,
    )


def _write_train_shards(
    world: SyntheticWorld, folder: Path, num_pairs: int, num_shards: int
) -> tuple[list[Path], list[str]]:
    """VIKDF's training pairs, spread as evenly as possible over ``num_shards`` shards: (shard files, captions)."""
    rng = world.rng("train-pairs")  # one stream through all shards
    files, captions = [], []
    for shard in range(num_shards):
        path = folder / f"{shard:05d}.tar"
        count = (shard + 1) * num_pairs // num_shards - shard * num_pairs // num_shards
        captions += _write_shard(world, rng, path, shard, count)
        files.append(path)
    return files, captions


def _sample_dialogue_splits(
    world: SyntheticWorld, num_dialogues: int, num_eval_dialogues: int
) -> dict[str, list[Dialogue]]:
    """The dialogues of every split: train and valid about dialogue kinds, test and probe about image-only kinds."""
    return {
        "train": world.dialogues("train-dialogues", num_dialogues, world.dialogue_objects),
        "valid": world.dialogues("valid-dialogues", num_eval_dialogues, world.dialogue_objects),
        "test": world.dialogues("test-dialogues", num_eval_dialogues, world.image_only_objects),
        # Held-out contexts about the image-only kinds, apart from the test set: what the demo's pre-training
        # criterion and the knowledge probe measure `K_T` on, so that neither looks at a test dialogue.
        "probe": world.dialogues("probe-dialogues", num_eval_dialogues, world.image_only_objects),
    }


def _write_dialogue_splits(world: SyntheticWorld, folder: Path, dialogues: dict[str, list[Dialogue]]) -> dict[str, Path]:
    """Train, valid and probe in Reddit JSON form, test in Image-Chat form; the files by `SyntheticWorldPaths` field."""
    files = {
        "reddit_train": (folder / "reddit" / "train.json", dialogues["train"]),
        "reddit_valid": (folder / "reddit" / "valid.json", dialogues["valid"]),
        "image_only_probe": (folder / "probe" / "image_only.json", dialogues["probe"]),
    }
    for path, split in files.values():
        _write_json(path, [{"context": list(d.context), "response": d.response} for d in split])
    image_chat_test = folder / "image_chat" / "test.json"
    style_rng = world.rng("image-chat-styles")
    _write_json(image_chat_test, [_image_chat_entry(world, d, i, style_rng) for i, d in enumerate(dialogues["test"])])
    return {field: path for field, (path, _) in files.items()} | {"image_chat_test": image_chat_test}


def _write_lm_corpus(world: SyntheticWorld, path: Path, train_captions: list[str], train: list[Dialogue]) -> Path:
    """One text per line, shuffled: only training text (captions and whole training dialogues), never validation or
    test text."""
    lines = train_captions + [" ".join([*d.context, d.response]) for d in train]
    world.rng("lm-corpus").shuffle(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_vocabulary(world: SyntheticWorld, path: Path, texts: list[str]) -> tuple[Path, tuple[str, ...]]:
    """Every word of `texts` and of the world's own word sets, sorted, one a line."""
    world_words = [k.name for k in world.kinds] + list(COLOURS) + list(BACKGROUNDS) + list(SHAPES)
    vocabulary = tuple(sorted({word for text in texts + world_words for word in tokenize_words(text)}))
    path.write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    return path, vocabulary


def _world_record(world: SyntheticWorld, counts: dict[str, int]) -> dict:
    """``world.json``: the configuration, the ground-truth object table and how many items each split holds."""
    return {
        "config": asdict(world),
        "objects": [asdict(kind) for kind in world.kinds],
        "colours": COLOURS,
        "backgrounds": BACKGROUNDS,
        "counts": counts,
    }
