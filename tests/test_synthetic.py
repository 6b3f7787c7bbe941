"""Tests of the synthetic image–text world and its dialogues (vikdf/demo/world.py)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from braceexpand import braceexpand
from PIL import Image

from vikdf.demo.world import (
    BACKGROUNDS,
    COLOUR_CAPTIONS,
    COLOURS,
    PLAIN_CAPTIONS,
    SHAPES,
    ObjectKind,
    SyntheticWorld,
    iter_shard_pairs,
    knowledge_accuracy,
    knowledge_table,
    make_object_kinds,
    mentioned_object,
    tokenize_words,
    write_synthetic_world,
)

SMALL = dict(num_pairs=120, num_shards=3, num_heldout_pairs=30, num_dialogues=60, num_eval_dialogues=24)
# The world of seed 3 (the module's world_dir): 48 kinds, 12 of them image-only.
KINDS = SyntheticWorld(seed=3).kinds
NAMES = [kind.name for kind in KINDS]
IMAGE_ONLY = {kind.name for kind in KINDS if kind.image_only}
TABLE = knowledge_table(KINDS)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return write_synthetic_world(tmp_path_factory.mktemp("world"), seed=3, image_size=32, **SMALL)


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _nearest(rgb, palette: dict) -> str:
    return min(palette, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, palette[name])))


def test_same_seed_gives_identical_bytes(tmp_path):
    first = write_synthetic_world(tmp_path / "a", seed=7, **SMALL)
    second = write_synthetic_world(tmp_path / "b", seed=7, **SMALL)
    other = write_synthetic_world(tmp_path / "c", seed=8, **SMALL)
    digests = _file_digests(first.root)
    assert digests == _file_digests(second.root)
    assert first.vocabulary == second.vocabulary
    # A different seed changes the data, not the layout.
    other_digests = _file_digests(other.root)
    assert other_digests.keys() == digests.keys()
    assert other_digests["lm_corpus.txt"] != digests["lm_corpus.txt"]


def test_shards_are_img2dataset_webdataset(world_dir):
    shard_files = [Path(p) for p in braceexpand(world_dir.train_shards)]
    assert shard_files == list(world_dir.train_shard_files)
    assert [p.name for p in shard_files] == ["00000.tar", "00001.tar", "00002.tar"]
    keys = []
    for shard_index, shard in enumerate([*shard_files, world_dir.heldout_shard]):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        shard_keys = sorted({name.split(".")[0] for name in members})
        for key in shard_keys:
            assert re.fullmatch(r"\d{9}", key)
            if shard in shard_files:
                assert int(key) // 10**4 == shard_index
            assert {f"{key}.jpg", f"{key}.txt", f"{key}.json"} <= members.keys()
            image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"
            caption = members[f"{key}.txt"].decode("utf-8")
            meta = json.loads(members[f"{key}.json"])
            assert caption and meta["key"] == key and meta["caption"] == caption and meta["status"] == "success"
            assert meta["attributes"]["object"] in tokenize_words(caption)
        assert len(members) == 3 * len(shard_keys)
        if shard in shard_files:
            keys += shard_keys
    assert len(keys) == len(set(keys)) == SMALL["num_pairs"]


def test_iter_shard_pairs_reads_images_and_captions(world_dir):
    pairs = list(iter_shard_pairs([world_dir.heldout_shard]))
    assert len(pairs) == SMALL["num_heldout_pairs"]
    key, image, caption = pairs[0]
    assert key == "000000000" and image.size == (32, 32) and isinstance(caption, str)


def test_jpeg_pixels_show_the_recorded_colour(world_dir):
    with tarfile.open(world_dir.train_shard_files[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in [n for n in members if n.endswith(".json")][:40]:
        attrs = json.loads(members[name])["attributes"]
        image = Image.open(io.BytesIO(members[name.replace(".json", ".jpg")])).convert("RGB")
        cx, cy = (int(c * image.width) for c in attrs["center"])
        assert _nearest(image.getpixel((cx, cy)), {**COLOURS, **BACKGROUNDS}) == attrs["colour"]
        # Objects are clamped inside the image, so a corner always shows the background.
        assert _nearest(image.getpixel((0, 0)), BACKGROUNDS) == attrs["background"]


def test_dialogue_json_forms(world_dir):
    for path in (world_dir.reddit_train, world_dir.reddit_valid):
        data = json.loads(path.read_text())
        assert isinstance(data, list) and data
        for item in data:
            assert set(item) == {"context", "response"}
            assert 1 <= len(item["context"]) <= 3 and all(isinstance(t, str) and t for t in item["context"])
            assert isinstance(item["response"], str) and item["response"]
    assert len(json.loads(world_dir.reddit_train.read_text())) == SMALL["num_dialogues"]
    test = json.loads(world_dir.image_chat_test.read_text())
    assert len(test) == SMALL["num_eval_dialogues"]
    for item in test:
        assert set(item) == {"image_hash", "dialog"} and isinstance(item["image_hash"], str)
        assert 2 <= len(item["dialog"]) <= 4
        assert all(len(turn) == 2 and all(isinstance(x, str) for x in turn) for turn in item["dialog"])
    assert len({item["image_hash"] for item in test}) == len(test)


def test_splits_separate_dialogue_and_image_only_objects(world_dir):
    reddit = [json.loads(p.read_text()) for p in (world_dir.reddit_train, world_dir.reddit_valid)]
    for split in reddit:
        objects = {mentioned_object(item["context"], NAMES) for item in split}
        assert None not in objects and not objects & IMAGE_ONLY
    test = json.loads(world_dir.image_chat_test.read_text())
    test_objects = Counter(mentioned_object([text for _, text in item["dialog"][:-1]], NAMES) for item in test)
    assert set(test_objects) == IMAGE_ONLY == set(world_dir.image_only_objects)
    assert len(set(test_objects.values())) == 1  # balanced: a constant guess scores exactly 1/6
    with pytest.raises(ValueError, match="not a multiple of the 12 image-only kinds"):
        write_synthetic_world(world_dir.root.parent / "unbalanced", seed=3, **{**SMALL, "num_eval_dialogues": 18})


def test_references_carry_the_knowledge_and_contexts_do_not(world_dir):
    colours = set(COLOURS) | set(SHAPES)
    reddit = json.loads(world_dir.reddit_train.read_text())
    test = json.loads(world_dir.image_chat_test.read_text())
    contexts = [item["context"] for item in reddit] + [[t for _, t in item["dialog"][:-1]] for item in test]
    responses = [item["response"] for item in reddit] + [item["dialog"][-1][1] for item in test]
    assert knowledge_accuracy(contexts, responses, TABLE) == 1.0
    assert all(not colours & set(tokenize_words(" ".join(context))) for context in contexts)
    assert {len(context) for context in contexts} == {1, 2, 3}


def test_no_training_text_links_image_only_objects_to_colour_or_shape(world_dir):
    leaking = set(COLOURS) | set(SHAPES)
    lines = world_dir.lm_corpus.read_text().splitlines()
    assert len(lines) == SMALL["num_pairs"] + SMALL["num_dialogues"]
    for line in lines:
        words = set(tokenize_words(line))
        if words & IMAGE_ONLY:
            assert not words & leaking, line
    # The corpus does carry the colours of dialogue objects, so the LM learns to talk about colours at all.
    assert any(set(tokenize_words(line)) & set(COLOURS) for line in lines)


def test_vocabulary_covers_every_text(world_dir):
    vocabulary = set(world_dir.vocabulary)
    assert world_dir.vocab_file.read_text().split("\n")[:-1] == list(world_dir.vocabulary)
    texts = world_dir.lm_corpus.read_text().splitlines()
    texts += [text for item in json.loads(world_dir.image_chat_test.read_text()) for _, text in item["dialog"]]
    texts += [caption for _, _, caption in iter_shard_pairs([world_dir.heldout_shard])]
    assert {word for text in texts for word in tokenize_words(text)} <= vocabulary
    assert set(NAMES) | set(COLOURS) <= vocabulary


def test_world_file_records_the_ground_truth(world_dir):
    recorded = json.loads(world_dir.world_file.read_text())
    assert {o["name"]: o["usual_colour"] for o in recorded["objects"]} == world_dir.knowledge_table() == TABLE
    assert recorded["config"]["seed"] == 3


def test_usual_colour_statistics():
    world = SyntheticWorld(seed=0)
    rng = world.rng("stats")
    samples = [world.sample_attributes(rng) for _ in range(12000)]
    per_object: dict[str, list[bool]] = {}
    for attrs in samples:
        per_object.setdefault(attrs.object, []).append(attrs.colour == attrs.usual_colour)
    assert set(per_object) == {kind.name for kind in world.kinds}
    overall = sum(map(sum, per_object.values())) / len(samples)
    assert abs(overall - world.usual_colour_prob) < 0.02
    for obj, hits in per_object.items():
        assert abs(sum(hits) / len(hits) - world.usual_colour_prob) < 0.1, obj
    # The usual colour is the single most frequent colour of each object by far.
    for kind in world.kinds:
        colours = Counter(a.colour for a in samples if a.object == kind.name)
        assert colours.most_common(1)[0][0] == kind.usual_colour


def test_captions_carry_colour_only_in_a_minority_and_never_for_image_only_objects():
    world = SyntheticWorld(seed=1)
    image_only = {kind.name for kind in world.image_only_objects}
    rng = world.rng("captions")
    pairs = [world.sample_pair(rng) for _ in range(3000)]
    for _, caption, attrs in pairs:
        words = set(tokenize_words(caption))
        assert attrs.object in words
        assert (attrs.colour in words) == attrs.mentions_colour
        if attrs.object in image_only:
            assert not attrs.mentions_colour and not words & (set(COLOURS) | set(SHAPES))
    seen = [attrs.mentions_colour for _, _, attrs in pairs if attrs.object not in image_only]
    assert abs(sum(seen) / len(seen) - world.colour_mention_prob) < 0.03


@pytest.mark.parametrize("recoloured", ["image_only", "all"])
def test_clip_pairs_show_recoloured_kinds_in_random_colours_and_every_kind_equally(recoloured):
    """The stand-in CLIP's pairs: the recoloured kinds carry no usual colour (CLIP learns their names, not their
    looks); VIKDF's pairs show image-only kinds `image_only_weight` times as often, in their usual colour."""
    world = SyntheticWorld(seed=4, clip_recoloured=recoloured)
    image_only = {kind.name for kind in world.image_only_objects}
    rng = world.rng("clip")
    clip = [world.sample_attributes(rng, for_clip=True) for _ in range(9600)]
    vikdf = [world.sample_attributes(rng) for _ in range(4800)]
    for kind in world.kinds:
        colours = Counter(a.colour for a in clip if a.object == kind.name)
        usual_share = colours[kind.usual_colour] / sum(colours.values())
        if kind.image_only or recoloured == "all":
            assert usual_share < 0.3 and len(colours) == len(COLOURS)  # 1/6 expected
        else:
            assert usual_share > 0.75
    assert abs(sum(a.object in image_only for a in clip) / len(clip) - 12 / 48) < 0.03
    weight = world.image_only_weight
    expected = 12 * weight / (12 * weight + 36)
    assert abs(sum(a.object in image_only for a in vikdf) / len(vikdf) - expected) < 0.03
    usual = [a.colour == a.usual_colour for a in vikdf if a.object in image_only]
    assert abs(sum(usual) / len(usual) - world.usual_colour_prob) < 0.03


def test_world_writes_the_clip_shard(world_dir):
    pairs = list(iter_shard_pairs([world_dir.clip_shard]))
    assert len(pairs) == SMALL["num_pairs"] and world_dir.clip_shard.parent.name == "clip"
    with pytest.raises(ValueError, match="clip_recoloured"):
        SyntheticWorld(clip_recoloured="some")


def test_caption_variety():
    world = SyntheticWorld(seed=2)
    rng = world.rng("variety")
    pairs = [world.sample_pair(rng) for _ in range(1000)]
    templates = {attrs.template for _, _, attrs in pairs}
    assert len(templates) == len(PLAIN_CAPTIONS) + len(COLOUR_CAPTIONS) >= 15
    # Three in four captions name the object alone ("a zorp."), so fewer are unique than scene captions would be.
    assert len({caption for _, caption, _ in pairs}) > 400
    scene = [any(word in caption for word in ("background", "backdrop", "left", "right", "top", "bottom", "middle",
                                              "centre", "center", "small", "large", "big", "little", "tiny", "huge"))
             for _, caption, _ in pairs]
    assert abs(sum(scene) / len(scene) - world.scene_caption_prob) < 0.05


def test_render_draws_each_shape_in_its_colour():
    world = SyntheticWorld(seed=0, image_size=64)
    rng = world.rng("render")
    shapes_seen = set()
    for _ in range(60):
        attrs = world.sample_attributes(rng)
        image = world.render(attrs)
        assert image.size == (64, 64)
        cx, cy = (int(c * 64) for c in attrs.center)
        assert _nearest(image.getpixel((cx, cy)), {**COLOURS, **BACKGROUNDS}) == attrs.colour
        shapes_seen.add(attrs.shape)
    assert shapes_seen == set(SHAPES)


def test_knowledge_accuracy_hand_cases():
    kinds = (ObjectKind("zorp", "circle", "red", True), ObjectKind("fep", "square", "green", True),
             ObjectKind("blicket", "square", "red", False), ObjectKind("kiki", "circle", "blue", False))
    table = knowledge_table(kinds)
    contexts = [
        ["hi!", "i saw a zorp at the park today."],  # zorp: red
        "my neighbour just got a fep.",  # fep: green
        ["a blicket was on the bus.", "oh nice, what did it look like?"],  # blicket: red
        "my kiki is here.",  # kiki: blue
        "hello there, how are you?",  # no object: not scored
    ]
    hypotheses = [
        "nice, was it red like most of them?",  # right
        "was it blue?",  # wrong colour
        "red or green, i forget.",  # hedging counts as wrong
        "it was lovely.",  # no colour: wrong
        "red!",  # ignored
    ]
    assert knowledge_accuracy(contexts, hypotheses, table) == pytest.approx(1 / 4)
    assert knowledge_accuracy(["i saw a ZORP."], ["Red, of course."], table) == 1.0
    # The last object mentioned is the one asked about.
    assert mentioned_object(["i have a zorp.", "and i got a fep yesterday."], table) == "fep"
    shape_table = knowledge_table(kinds, "shape")
    assert knowledge_accuracy(["i saw a zorp."], ["a red circle!"], table=shape_table) == 1.0
    with pytest.raises(ValueError):
        knowledge_accuracy(["hello"], ["red"], table)
    with pytest.raises(ValueError):
        knowledge_accuracy(["i saw a zorp."], [], table)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_names_come_from_the_seed_pronounceable_distinct_and_none_inside_another(seed):
    kinds = make_object_kinds(seed, names_per_look=3, image_only_per_colour=3)
    names = [kind.name for kind in kinds]
    assert len(set(names)) == len(names) == 72
    for name in names:
        assert tokenize_words(name) == [name]  # one word of lowercase letters
        assert re.fullmatch(r"([^aeiou]+[aeiou]+[^aeiou]*){2}", name), name  # two consonant-vowel syllables
        assert not [other for other in names if other != name and name in other]  # neither prefix nor sub-word
    template_words = {word for text in (*PLAIN_CAPTIONS, *COLOUR_CAPTIONS) for word in tokenize_words(text)}
    assert not any(name in word for name in names for word in template_words | set(COLOURS) | set(SHAPES))
    assert names == [kind.name for kind in make_object_kinds(seed, 3, 3)]  # the same seed, the same names
    assert names != [kind.name for kind in make_object_kinds(seed + 10, 3, 3)]


@pytest.mark.parametrize("names_per_look, image_only_per_colour", [(2, 2), (3, 2), (4, 4)])
def test_several_kinds_share_each_look_and_image_only_kinds_are_balanced(names_per_look, image_only_per_colour):
    kinds = make_object_kinds(0, names_per_look, image_only_per_colour)
    looks = Counter((kind.shape, kind.usual_colour) for kind in kinds)
    assert set(looks.values()) == {names_per_look} and len(looks) == 24  # a kind is a name with a usual look
    image_only = [kind for kind in kinds if kind.image_only]
    assert set(Counter(kind.usual_colour for kind in image_only).values()) == {image_only_per_colour}
    shapes = Counter(kind.shape for kind in image_only)
    assert max(shapes.values()) - min(shapes.values()) <= 1 and len(shapes) == len(SHAPES)
    # every look keeps a dialogue kind, so a read-out of every colour and shape can be learnt on dialogues
    assert {(k.shape, k.usual_colour) for k in kinds if not k.image_only} == set(looks)
    with pytest.raises(ValueError, match="names_per_look"):
        make_object_kinds(0, 1, 1)


def test_default_size_is_written_in_seconds(tmp_path):
    start = time.perf_counter()
    paths = write_synthetic_world(tmp_path, seed=0, num_pairs=2000, num_dialogues=1000)
    assert time.perf_counter() - start < 20.0  # training, held-out and the stand-in CLIP's pairs
    assert sum(1 for _ in iter_shard_pairs(paths.train_shard_files)) == 2000
