"""Image–text pair pipeline (vikdf/data/pairs.py): real tar shards, COCO files and an imagefolder on disk."""

import io
import itertools
import json
import logging
import tarfile

import datasets
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vikdf.data.pairs import (
    CLIP_MEAN,
    CLIP_STD,
    HFPairSource,
    MixedPairDataset,
    PairSourceSpec,
    SkipCounter,
    WebDatasetSource,
    build_image_transform,
    build_pair_dataset,
    parse_probabilities,
)


def _image_bytes(fmt: str, shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (shade, 255 - shade, 40)).save(buffer, fmt)
    return buffer.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard_dir(tmp_path):
    """cc/00000..00003.tar: 11 good pairs; shard 0 also holds one of each kind of broken sample."""
    folder = tmp_path / "cc"
    folder.mkdir()
    _write_tar(
        folder / "00000.tar",
        [
            ("000000000.jpg", _image_bytes("JPEG", 10)),
            ("000000000.txt", b"a red square "),
            ("000000000.json", b'{"url": "http://example.invalid/0.jpg"}'),
            ("000000001.png", _image_bytes("PNG", 20)),
            ("000000001.txt", b"a png picture"),
            ("000000002.jpg", b"\xff\xd8 these are not jpeg bytes"),
            ("000000002.txt", b"corrupt image"),
            ("000000003.jpg", _image_bytes("JPEG", 30)),
            ("000000003.txt", b"  \n "),
            ("000000004.jpg", _image_bytes("JPEG", 40)),
            ("000000005.txt", b"caption without an image"),
        ],
    )
    for shard in range(1, 4):
        members = []
        for i in range(3):
            key = f"{shard:04d}{i:05d}"
            members += [(f"{key}.jpg", _image_bytes("JPEG", 50 + i)), (f"{key}.txt", f"picture {key}".encode())]
        _write_tar(folder / f"{shard:05d}.tar", members)
    return folder


GOOD_KEYS = {"000000000", "000000001"} | {f"{s:04d}{i:05d}" for s in range(1, 4) for i in range(3)}
SHARD_SKIPS = {"unreadable_image": 1, "empty_caption": 1, "missing_text": 1, "missing_image": 1, "unreadable_shard": 0}


@pytest.fixture
def coco_dir(tmp_path):
    """3 good captions; one empty, one for an unknown image id, one whose file is missing on disk."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "train2017" / "000000000001.jpg").write_bytes(_image_bytes("JPEG", 100))
    (root / "train2017" / "000000000002.png").write_bytes(_image_bytes("PNG", 120))
    captions = {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg"},
            {"id": 2, "file_name": "000000000002.png"},
            {"id": 4, "file_name": "000000000004.jpg"},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "A cat on a mat."},
            {"id": 12, "image_id": 1, "caption": "A black cat."},
            {"id": 21, "image_id": 2, "caption": "A dog in the park."},
            {"id": 22, "image_id": 2, "caption": "   "},
            {"id": 31, "image_id": 3, "caption": "An image that is not listed."},
            {"id": 41, "image_id": 4, "caption": "An image that is not on disk."},
        ],
    }
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(captions))
    return root


def _coco_spec(root) -> str:
    return f"coco:{root}/annotations/captions_train2017.json:{root}/train2017"


@pytest.fixture
def image_folder(tmp_path):
    """imagefolder with metadata.jsonl: 5 good pairs, one empty text, one corrupt image."""
    root = tmp_path / "folder"
    root.mkdir()
    rows = []
    for i in range(5):
        (root / f"img{i}.png").write_bytes(_image_bytes("PNG", 10 * i))
        rows.append({"file_name": f"img{i}.png", "text": f"folder picture {i}"})
    (root / "blank.png").write_bytes(_image_bytes("PNG", 200))
    rows.append({"file_name": "blank.png", "text": ""})
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows.append({"file_name": "broken.png", "text": "a broken file"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _keys(dataset) -> list[str]:
    return [example["key"] for example in dataset]


def test_webdataset_shards_yield_good_pairs_and_count_skips(shard_dir, caplog):
    dataset = build_pair_dataset(f"wds:{shard_dir}/{{00000..00003}}.tar", infinite=False, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        examples = list(dataset)
    assert {e["key"] for e in examples} == GOOD_KEYS and len(examples) == len(GOOD_KEYS)
    for example in examples:
        assert isinstance(example["image"], Image.Image) and example["image"].mode == "RGB"
        assert example["source"] == "cc"
    by_key = {e["key"]: e for e in examples}
    assert by_key["000000000"]["caption"] == "a red square"
    assert by_key["000000001"]["image"].size == (16, 12)
    assert dataset.skips.counts == SHARD_SKIPS and dataset.skips.total == 4
    # the warning names the shard file and the key
    assert any("00000.tar" in r.getMessage() and "000000002" in r.getMessage() for r in caplog.records)


def test_pattern_forms_are_equivalent(shard_dir):
    whole = sorted(
        _keys(build_pair_dataset(f"wds:{shard_dir}/{{00000..00003}}.tar", infinite=False, rank=0, world_size=1))
    )
    joined = f"wds:{shard_dir}/{{00000..00001}}.tar::{shard_dir}/{{00002..00003}}.tar"
    assert sorted(_keys(build_pair_dataset(joined, infinite=False, rank=0, world_size=1))) == whole
    as_list = WebDatasetSource(
        [f"{shard_dir}/0000{{0,1}}.tar", f"file://{shard_dir}/00002.tar", f"{shard_dir}/00003.tar"]
    )
    assert len(as_list.shards) == 4
    assert sorted(_keys(MixedPairDataset([as_list], infinite=False, rank=0, world_size=1))) == whole


def test_missing_shard_is_a_clear_construction_error(shard_dir):
    pattern = f"{shard_dir}/{{00000..00005}}.tar"
    with pytest.raises(FileNotFoundError, match=r"00004\.tar") as error:
        build_pair_dataset(f"wds:{pattern}")
    assert pattern in str(error.value) and "2 of 6" in str(error.value)


def test_truncated_shard_is_counted_not_fatal(shard_dir):
    with tarfile.open(shard_dir / "00001.tar") as tar:
        cut = tar.getmembers()[2].offset_data + 10  # first sample complete, the second's image cut short
    data = (shard_dir / "00001.tar").read_bytes()
    (shard_dir / "00001.tar").write_bytes(data[:cut])
    dataset = build_pair_dataset(f"wds:{shard_dir}/00001.tar", infinite=False, rank=0, world_size=1)
    assert _keys(dataset) == ["000100000"]
    assert dataset.skips.counts["unreadable_shard"] == 1


@pytest.mark.parametrize("world_size", [2, 3, 8])  # 4 shards: split by shard (2) or by sample (3, 8)
def test_ranks_read_disjoint_data_and_skips_are_counted_once(shard_dir, world_size):
    skips = SkipCounter()
    per_rank = [
        _keys(
            build_pair_dataset(
                f"wds:{shard_dir}/{{00000..00003}}.tar", infinite=False, rank=r, world_size=world_size, skips=skips
            )
        )
        for r in range(world_size)
    ]
    seen = [k for keys in per_rank for k in keys]
    assert len(seen) == len(set(seen)) and set(seen) == GOOD_KEYS
    assert skips.counts == SHARD_SKIPS


def test_rank_comes_from_torch_distributed_when_initialised(shard_dir, monkeypatch):
    spec = f"wds:{shard_dir}/{{00000..00003}}.tar"
    explicit = _keys(build_pair_dataset(spec, infinite=False, rank=1, world_size=2))
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    assert _keys(build_pair_dataset(spec, infinite=False)) == explicit


def test_dataloader_workers_split_work_and_share_skip_counts(shard_dir):
    dataset = build_pair_dataset(f"wds:{shard_dir}/{{00000..00003}}.tar", infinite=False, rank=0, world_size=1)
    loader = DataLoader(dataset, batch_size=None, num_workers=2)
    keys = [example["key"] for example in loader]
    assert len(keys) == len(set(keys)) and set(keys) == GOOD_KEYS
    assert dataset.skips.counts == SHARD_SKIPS  # counted in the workers, read in this process


def test_coco_captions_one_example_per_caption(coco_dir):
    dataset = build_pair_dataset(_coco_spec(coco_dir), infinite=False, rank=0, world_size=1)
    examples = list(dataset)
    assert sorted(e["key"] for e in examples) == ["11", "12", "21"]
    assert {e["caption"] for e in examples} == {"A cat on a mat.", "A black cat.", "A dog in the park."}
    assert all(e["source"] == "coco" and e["image"].mode == "RGB" for e in examples)
    assert dataset.skips.counts == {
        "unreadable_image": 1,
        "empty_caption": 1,
        "missing_text": 0,
        "missing_image": 1,
        "unreadable_shard": 0,
    }
    halves = [_keys(build_pair_dataset(_coco_spec(coco_dir), infinite=False, rank=r, world_size=2)) for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == ["11", "12", "21"]


def test_coco_wrong_paths_fail_at_construction(coco_dir):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        build_pair_dataset(f"coco:{coco_dir}/annotations/captions_val2017.json:{coco_dir}/train2017")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        build_pair_dataset(f"coco:{coco_dir}/annotations/captions_train2017.json:{coco_dir}/val2017")


def test_imagefolder_streaming_source(image_folder):
    spec = f"hf:imagefolder:{image_folder}:image:text"
    dataset = build_pair_dataset(spec, infinite=False, rank=0, world_size=1)
    examples = list(dataset)
    assert sorted(e["caption"] for e in examples) == [f"folder picture {i}" for i in range(5)]
    assert all(e["source"] == "folder" and e["key"].endswith(".png") for e in examples)
    assert dataset.skips.counts["empty_caption"] == 1 and dataset.skips.counts["unreadable_image"] == 1
    halves = [_keys(build_pair_dataset(spec, infinite=False, rank=r, world_size=2)) for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0]) + len(halves[1]) == 5


def test_map_style_dataset_with_caption_lists(coco_dir):
    images = [str(coco_dir / "train2017" / "000000000001.jpg"), str(coco_dir / "train2017" / "000000000002.png")]
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))})
    table = datasets.Dataset.from_dict({"image": images, "captions": [["one", "two"], ["three"]]}, features=features)
    source = HFPairSource(table, "image", "captions", name="table")
    examples = list(MixedPairDataset([source], infinite=False, rank=0, world_size=1))
    assert [e["caption"] for e in examples] == ["one", "two", "three"]
    assert examples[0]["key"].endswith("000000000001.jpg#0")
    with pytest.raises(ValueError, match="no column 'text'"):
        HFPairSource(table, "image", "text")


def test_mixing_follows_probabilities_and_seed(shard_dir, coco_dir):
    def stream(seed, n):
        dataset = build_pair_dataset(
            [_coco_spec(coco_dir), f"wds:{shard_dir}/{{00000..00003}}.tar"], "0.2,0.8", seed=seed, rank=0, world_size=1
        )
        return [(e["source"], e["key"]) for e in itertools.islice(dataset, n)]

    drawn = stream(0, 1000)
    coco_share = sum(source == "coco" for source, _ in drawn) / len(drawn)
    assert 0.16 < coco_share < 0.24  # infinite: the 3 COCO pairs are repeated as often as drawn
    assert stream(0, 100) == drawn[:100]
    assert stream(1, 100) != drawn[:100]


def test_finite_mix_reads_every_pair_once_and_epochs_reshuffle(shard_dir, coco_dir):
    specs = f"{_coco_spec(coco_dir)};cc=wds:{shard_dir}/{{00000..00003}}.tar"
    dataset = build_pair_dataset(specs, "1 4", infinite=False, rank=0, world_size=1)
    first = _keys(dataset)
    assert sorted(first) == sorted(GOOD_KEYS | {"11", "12", "21"})
    dataset.set_epoch(1)
    assert sorted(_keys(dataset)) == sorted(first) and _keys(dataset) != first


def test_shuffle_buffer_permutes_deterministically(shard_dir):
    def keys(buffer):
        spec = f"wds:{shard_dir}/{{00000..00003}}.tar"
        return _keys(build_pair_dataset(spec, infinite=False, shuffle_buffer=buffer, rank=0, world_size=1))

    plain, shuffled = keys(0), keys(4)
    assert sorted(shuffled) == sorted(plain) and shuffled != plain and keys(4) == shuffled


def test_source_without_usable_pairs_stops_an_infinite_stream(tmp_path):
    _write_tar(tmp_path / "bad.tar", [("a.jpg", b"not an image"), ("a.txt", b"caption")])
    dataset = build_pair_dataset(f"wds:{tmp_path}/bad.tar", rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="no usable pair"):
        next(iter(dataset))


def test_image_transforms(shard_dir):
    train = build_image_transform(32, train=True, mean=CLIP_MEAN, std=CLIP_STD)
    crop = train.transforms[0]
    assert crop.scale == (0.5, 1.0) and "bicubic" in str(crop.interpolation).lower()
    assert not any("ColorJitter" in type(t).__name__ for t in train.transforms)
    image = Image.new("RGB", (50, 40), (255, 0, 0))
    assert train(image).shape == (3, 32, 32)
    evaluate = build_image_transform(32, train=False)
    pixels = evaluate(image)
    assert pixels.shape == (3, 32, 32) and torch.equal(pixels, evaluate(image))
    expected_red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert torch.allclose(pixels[0], torch.full((32, 32), expected_red), atol=1e-4)


def test_spec_parser():
    spec = PairSourceSpec.parse("cc_sbu=wds:/d/cc/{00000..00069}.tar::/d/sbu/{0..9}.tar")
    assert (spec.kind, spec.name, spec.path) == ("wds", "cc_sbu", "/d/cc/{00000..00069}.tar::/d/sbu/{0..9}.tar")
    spec = PairSourceSpec.parse("coco:/d/coco/annotations/captions_train2017.json:/d/coco/train2017")
    assert (spec.kind, spec.path, spec.image_dir) == (
        "coco",
        "/d/coco/annotations/captions_train2017.json",
        "/d/coco/train2017",
    )
    spec = PairSourceSpec.parse("hf:imagefolder:/d/folder:image:text")
    assert (spec.path, spec.data_dir, spec.image_column, spec.text_column, spec.split) == (
        "imagefolder",
        "/d/folder",
        "image",
        "text",
        "train",
    )
    spec = PairSourceSpec.parse("laion=hf:org/pairs:jpg:txt@validation")
    assert (spec.name, spec.path, spec.data_dir, spec.image_column, spec.split) == (
        "laion",
        "org/pairs",
        None,
        "jpg",
        "validation",
    )
    for bad, message in [
        ("tar:/d/x.tar", "Unknown source kind 'tar'"),
        ("/d/x.tar", "Cannot parse image-text source"),
        ("wds:", "Cannot parse image-text source"),
        ("wds:/d/a.tar::", "Empty shard pattern"),
        ("coco:/d/captions.json", "expected \\[NAME=\\]coco"),
        ("hf:imagefolder:image", "expected \\[NAME=\\]hf"),
        ("hf:org/pairs:jpg:txt@", "expected \\[NAME=\\]hf"),
    ]:
        with pytest.raises(ValueError, match=message):
            PairSourceSpec.parse(bad)


def test_probabilities_are_validated(coco_dir):
    assert parse_probabilities("0.2,0.8") == [0.2, 0.8] and parse_probabilities("1 4") == [1.0, 4.0]
    with pytest.raises(ValueError, match="Cannot parse source probabilities"):
        parse_probabilities("0.2,x")
    with pytest.raises(ValueError, match="1 sources but 2 probabilities"):
        build_pair_dataset(_coco_spec(coco_dir), "0.2,0.8")
    with pytest.raises(ValueError, match="positive"):
        build_pair_dataset(_coco_spec(coco_dir), [0.0])
    with pytest.raises(ValueError, match="rank and world_size"):
        build_pair_dataset(_coco_spec(coco_dir), rank=2, world_size=2)


def test_skip_counter_warns_first_few_then_reports_totals(caplog):
    skips = SkipCounter(warn_first=2, report_every=3)
    with caplog.at_level(logging.WARNING):
        for i in range(6):
            skips.add("empty_caption" if i % 2 else "unreadable_image", "cc", "cc/00007.tar", f"key{i}")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Skipping pair" in m for m in messages) == 2 and "'key0'" in messages[0] and "00007.tar" in messages[0]
    assert sum("so far: 3 total" in m for m in messages) == 1 and any("so far: 6 total" in m for m in messages)
    assert skips.counts["empty_caption"] == 3 and skips.counts["unreadable_image"] == 3 and skips.total == 6
    with pytest.raises(ValueError):
        skips.add("no_such_reason", "cc", "cc/00007.tar", "key")


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_state_resumes_every_source_kind_in_every_worker(shard_dir, coco_dir, image_folder, workers):
    """A mix of wds, COCO, streaming and map-style `datasets` sources with a shuffle buffer, read by a
    StatefulDataLoader: restored from its state after 5 batches, a new stream yields exactly the next batches
    (keys, positions, pixels), and a different reader layout is refused."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    table = datasets.Dataset.from_dict(
        {"image": [str(coco_dir / "train2017" / "000000000001.jpg")] * 3, "text": ["t0", "t1", "t2"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )

    def loader(world_size=1):
        specs = [f"wds:{shard_dir}/{{00000..00003}}.tar", _coco_spec(coco_dir), f"hf:imagefolder:{image_folder}:image:text"]
        dataset = build_pair_dataset(specs, seed=3, shuffle_buffer=4, rank=0, world_size=world_size)
        dataset.sources.append(HFPairSource(table, name="table"))
        dataset.probabilities = [0.25] * 4
        transform = build_image_transform(8, train=False)

        def collate(examples):
            return [(e["source"], e["key"], e["stream_position"]) for e in examples], torch.stack(
                [transform(e["image"]) for e in examples]
            )

        return StatefulDataLoader(dataset, batch_size=3, collate_fn=collate, num_workers=workers)

    first = loader()
    batches = iter(first)
    consumed = [next(batches) for _ in range(5)]
    state = first.state_dict()
    expected = [next(batches) for _ in range(6)]
    resumed = loader()
    resumed.load_state_dict(state)
    got = list(itertools.islice(resumed, 6))
    assert {source for batch, _ in consumed + expected for source, _, _ in batch} == {"cc", "coco", "folder", "table"}
    for (keys, pixels), (expected_keys, expected_pixels) in zip(got, expected, strict=True):
        assert keys == expected_keys and torch.equal(pixels, expected_pixels)

    other_layout = loader(world_size=2)
    other_layout.load_state_dict(state)
    with pytest.raises(ValueError, match=rf"this one is reader \d of {2 * max(workers, 1)}: resume with the same"):
        next(iter(other_layout))


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_resuming_inside_a_shard_skips_to_the_offset(tmp_path, suffix):
    """Mid-shard: a plain tar is entered at the saved byte offset, a compressed one is read from its start and
    passed over; both continue with the next sample."""
    members = []
    for i in range(6):
        key = f"{i:05d}"
        members += [(f"{key}.jpg", _image_bytes("JPEG", 20 * i)), (f"{key}.json", b"{}"), (f"{key}.txt", key.encode())]
    with tarfile.open(tmp_path / f"shard{suffix}", "w:gz" if suffix.endswith("gz") else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def dataset():
        return build_pair_dataset(f"wds:{tmp_path}/shard{suffix}", infinite=False, rank=0, world_size=1)

    first = dataset()
    stream = iter(first)
    consumed = [next(stream)["key"] for _ in range(2)]
    state = first.state_dict()
    assert state["cursors"][0][1] > 0  # a byte offset inside the shard
    resumed = dataset()
    resumed.load_state_dict(state)
    assert consumed + _keys(resumed) == [f"{i:05d}" for i in range(6)]
