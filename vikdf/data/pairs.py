"""Image–text pairs for VIKDF pre-training (paper §3.2–3.3, §4.2).

Sources are read as they are distributed, and streamed, so that tens of millions of pairs never sit in memory:

* webdataset tar shards as img2dataset writes them for CC3M/CC12M/SBU/LAION (`KEY.jpg` + `KEY.txt` [+ `KEY.json`]),
* COCO captions (`annotations/captions_train2017.json` + the image folder), one example per (image, caption),
* any `datasets` dataset with an image column and a text column (Hub id, local folder, `imagefolder` builder).

`MixedPairDataset` draws from several sources with given probabilities (released recipe: COCO 0.2, CC+SBU 0.8),
deterministically given a seed, and splits the work over distributed ranks × DataLoader workers so that no two
readers see the same pair. Broken pairs are skipped and counted, never fatal; a wrong path is a user error and
fails at construction.

The stream is resumable without reading it again: `MixedPairDataset.state_dict()` holds each reader's position
(shard and byte offset, COCO/`datasets` row, the `datasets` streaming state), the shuffle buffer's undecoded
records and the mixing RNG; `torchdata`'s `StatefulDataLoader` collects it from every DataLoader worker.

Command-line source specs (see `PairSourceSpec.parse`)::

    [NAME=]wds:PATTERN[::PATTERN...]
    [NAME=]coco:ANNOTATION_JSON:IMAGE_DIR
    [NAME=]hf:PATH[:DATA_DIR]:IMAGE_COLUMN:TEXT_COLUMN[@SPLIT]

e.g. `cc_sbu=wds:/data/cc/{00000..00069}.tar::/data/sbu/{00000..00009}.tar`,
`coco:/data/coco/annotations/captions_train2017.json:/data/coco/train2017`, `hf:imagefolder:/data/folder:image:text`.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import datasets
import fsspec
import numpy as np
import torch
from braceexpand import UnbalancedBracesError, braceexpand
from datasets.distributed import split_dataset_by_node
from PIL import Image
from timm.data import create_transform
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch.utils.data import IterableDataset, get_worker_info
from transformers.utils import logging

from vikdf.data.files import read_json

logger = logging.get_logger(__name__)

CLIP_MEAN: tuple[float, float, float] = OPENAI_CLIP_MEAN
CLIP_STD: tuple[float, float, float] = OPENAI_CLIP_STD
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("unreadable_image", "empty_caption", "missing_text", "missing_image", "unreadable_shard")

Example = dict[str, Any]


# --------------------------------------------------------------------------------------------------- transforms


def build_image_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    *,
    min_scale: float = 0.5,
    hflip: float = 0.5,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised `(3, image_size, image_size)` tensor, built with `timm.data.create_transform`.

    Train: BLIP-2's pre-training recipe, which the paper follows (§3.4.1): random resized crop with
    scale (`min_scale`, 1), bicubic, horizontal flip (BLIP-2's `blip2_image_train` flips too), no colour jitter,
    then mean/std normalisation (CLIP's by default, since the image tower is CLIP ViT-L/14).
    Eval: CLIP's own preprocessing, bicubic resize of the short side to `image_size`, then a centre crop.
    """
    if train:
        return create_transform(
            image_size,
            is_training=True,
            scale=(min_scale, 1.0),
            interpolation="bicubic",
            hflip=hflip,
            color_jitter=None,  # timm's ImageNet default (0.4) is not part of BLIP-2's recipe
            mean=tuple(mean),
            std=tuple(std),
        )
    return create_transform(
        image_size, is_training=False, crop_pct=1.0, interpolation="bicubic", mean=tuple(mean), std=tuple(std)
    )


# --------------------------------------------------------------------------------------------------- skips


class SkipCounter:
    """Counts skipped pairs by reason (`SKIP_REASONS`), visible from the training process.

    The table lives in shared memory, one row per process slot (main process = row 0, DataLoader worker w =
    row 1 + w), so workers never write the same cell and `counts` read by the trainer includes what its
    workers skipped. The first `warn_first` skips of each process are logged with source, file and key;
    after that the totals are logged every `report_every` skips.
    """

    def __init__(self, warn_first: int = 5, report_every: int = 1000, slots: int = 65) -> None:
        self._table = torch.zeros(slots, len(SKIP_REASONS), dtype=torch.int64).share_memory_()
        self.warn_first = warn_first
        self.report_every = report_every
        self._seen_here = 0  # per process: each worker holds its own copy of this attribute

    def add(self, reason: str, source: str, location: str, key: str, detail: str = "") -> None:
        """Record one skipped pair (or shard) and log it if it is among the first few or a reporting point."""
        self._table[self._row(), SKIP_REASONS.index(reason)] += 1
        self._seen_here += 1
        if self._seen_here <= self.warn_first:
            because = f" ({detail})" if detail else ""
            logger.warning(f"Skipping pair {key!r} of source {source!r} in {location}: {reason}{because}")
        if self._seen_here % self.report_every == 0:
            logger.warning(f"Skipped image-text pairs so far: {self.summary()}")

    def _row(self) -> int:
        worker = get_worker_info()
        return 0 if worker is None else 1 + worker.id % (self._table.shape[0] - 1)

    def row_state(self) -> list[int]:
        """This process's counts (part of a resumable stream's state, so that the logged totals carry on)."""
        return self._table[self._row()].tolist()

    def load_row_state(self, counts: Sequence[int]) -> None:
        self._table[self._row()] = torch.tensor(counts, dtype=torch.int64)

    @property
    def counts(self) -> dict[str, int]:
        """Skips per reason, summed over the main process and all DataLoader workers."""
        return dict(zip(SKIP_REASONS, self._table.sum(dim=0).tolist(), strict=True))

    @property
    def total(self) -> int:
        return int(self._table.sum())

    def summary(self) -> str:
        return f"{self.total} total (" + ", ".join(f"{k}={v}" for k, v in self.counts.items()) + ")"


def _decode_image(data: bytes | str | Image.Image) -> Image.Image:
    """Fully decode an image (bytes, path/URL, or PIL) to RGB; raises whatever PIL or the file system raises."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, str):
        data = _read_bytes(data)
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")  # convert() forces the full decode, so truncated files fail here, not later


def _read_bytes(path: str) -> bytes:
    with _open_binary(path) as f:
        return f.read()


def _open_binary(path: str):
    # fsspec so that URLs (file://, s3://, hf://, …) work where the filesystem is installed; plain open otherwise
    return fsspec.open(path, "rb").open() if "://" in path else open(path, "rb")


@dataclass(frozen=True)
class PairRecord:
    """One pair as a source reads it, image not yet decoded: what a checkpoint keeps of the shuffle buffer."""

    image: bytes | str | Image.Image | None
    caption: str | None
    source: str
    location: str
    key: str


def _make_pair(record: PairRecord, skips: SkipCounter) -> Example | None:
    """Validate and decode one pair, or count the reason it is skipped and return None."""
    image_data, caption, source, location, key = (
        record.image, record.caption, record.source, record.location, record.key
    )
    if image_data is None:
        skips.add("missing_image", source, location, key)
        return None
    if caption is None:
        skips.add("missing_text", source, location, key)
        return None
    caption = caption.strip()
    if not caption:
        skips.add("empty_caption", source, location, key)
        return None
    try:
        image = _decode_image(image_data)
    except Exception as error:  # any decoding failure (PIL, zlib, I/O, decompression bomb) means a bad pair
        skips.add("unreadable_image", source, location, key, f"{type(error).__name__}: {error}")
        return None
    return {"image": image, "caption": caption, "source": source, "key": key}


# --------------------------------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Partition:
    """The slice of the data one reader takes: reader `index` of `count` (= world size × DataLoader workers)."""

    index: int
    count: int


def current_partition(rank: int | None = None, world_size: int | None = None) -> Partition:
    """This reader's partition; rank/world size from `torch.distributed` when initialised, unless given."""
    if rank is None or world_size is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    worker = get_worker_info()
    workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
    return Partition(index=rank * workers + worker_id, count=world_size * workers)


def _permutation(n: int, *seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(n).tolist()


Cursor = Any  # a source's position within one pass, small and picklable; None = the start of the pass


class PairSource(Protocol):
    """A source of pairs. `records` yields this reader's share, in an order that depends on (seed, epoch), each
    record with the cursor just after it; given that cursor it starts there without reading what came before."""

    name: str

    def records(
        self, part: Partition, seed: int, epoch: int, skips: SkipCounter, cursor: Cursor = None
    ) -> Iterator[tuple[Cursor, PairRecord]]: ...


# --------------------------------------------------------------------------------------------------- sources


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Expand brace patterns (`cc/{00000..00069}.tar`, several joined by `::` or given as a list) into paths.

    Local paths must exist: a missing shard is a user error and raises `FileNotFoundError` naming the pattern
    and the path. URLs (`scheme://…`) are opened with fsspec at read time and not checked here.
    """
    if isinstance(patterns, str):
        patterns = patterns.split("::")
    shards: list[str] = []
    for pattern in patterns:
        if not pattern:
            raise ValueError(f"Empty shard pattern in {list(patterns)!r}")
        try:
            expanded = list(braceexpand(pattern))
        except UnbalancedBracesError:
            raise ValueError(
                f"Shard pattern {pattern!r} has unbalanced braces; a range is written like {{00000..00069}}."
            ) from None
        folders = [p for p in expanded if os.path.isdir(p)]
        if folders:
            raise IsADirectoryError(
                f"Shard pattern {pattern!r}: {folders[0]!r} is a folder, not a shard; give the tar files, e.g. "
                f"{os.path.join(folders[0], '{00000..00009}.tar')!r}"
            )
        missing = [p for p in expanded if "://" not in p and not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"Shard pattern {pattern!r}: {len(missing)} of {len(expanded)} shard file(s) missing, "
                f"first missing: {missing[0]!r}"
            )
        shards.extend(expanded)
    return shards


class _EndCheckedTarInfo(tarfile.TarInfo):
    """A member header that reports a shard cut short: `tarfile` takes a missing header (the file ends where the
    next member would start, e.g. a copy cut at a 512-byte block) or a garbled one as the end of the archive and
    stops without a word, losing the rest of the shard. A complete tar ends with zero blocks instead."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as error:
            raise tarfile.ReadError(
                f"the shard ends without tar's end-of-archive blocks ({error}): is it cut short?"
            ) from None


class WebDatasetSource:
    """Tar shards as img2dataset writes them: members `KEY.jpg|jpeg|png|webp` and `KEY.txt` (+ ignored extras).

    Read with `tarfile` in streaming mode, members grouped by key (the member path up to the first dot of its
    file name, as webdataset does). With at least as many shards as readers, each reader owns a fixed set of
    whole shards (reshuffled per epoch); with fewer, every reader scans all shards and keeps every
    `count`-th sample, so that small sources still split without overlap.
    """

    def __init__(self, patterns: str | Sequence[str], name: str | None = None) -> None:
        self.shards = expand_shards(patterns)
        self.name = name or Path(self.shards[0]).parent.name or "wds"

    def records(
        self, part: Partition, seed: int, epoch: int, skips: SkipCounter, cursor: Cursor = None
    ) -> Iterator[tuple[Cursor, PairRecord]]:
        """Cursor: (shard number in this pass, byte offset of the next sample in it, samples seen this pass)."""
        order = [self.shards[i] for i in _permutation(len(self.shards), seed)]
        if len(order) >= part.count:
            mine = order[part.index :: part.count]
            shards = [mine[i] for i in _permutation(len(mine), seed, epoch, part.index)]
            stride, reporter = 1, skips
        else:
            # every reader reads every shard here: only reader 0 reports an unreadable shard, once
            shards, stride, reporter = order, part.count, skips if part.index == 0 else None
        first, offset, position = cursor or (0, 0, 0)
        for number in range(first, len(shards)):
            shard = shards[number]
            for key, members, next_offset in self._samples(shard, offset if number == first else 0, reporter):
                position += 1
                if (position - 1) % stride == part.index % stride:
                    after = (number, next_offset, position) if next_offset is not None else (number + 1, 0, position)
                    yield after, self._to_record(shard, key, members)

    def pairs_in_order(self, skips: SkipCounter) -> Iterator[Example]:
        """Every usable pair of every shard, once, in the order given: no partition, no shuffle, no pass after the
        first. Pairs that cannot be used are counted in `skips` and left out, as in the training stream."""
        for shard in self.shards:
            for key, members, _ in self._samples(shard, 0, skips):
                pair = _make_pair(self._to_record(shard, key, members), skips)
                if pair is not None:
                    yield pair

    def _samples(
        self, shard: str, start: int, skips: SkipCounter | None
    ) -> Iterator[tuple[str, dict[str, bytes], int | None]]:
        """(key, {extension: bytes}, byte offset of the next sample or None) per sample from byte `start` on; a
        shard that cannot be read is counted and left, not fatal."""
        key, members = None, {}
        try:
            with _open_binary(shard) as f:
                # An uncompressed tar (what img2dataset writes) is entered at the offset; a compressed one is read
                # from its start, its earlier members passed over undecoded.
                base = start if start and shard.endswith(".tar") else 0
                f.seek(base)
                with tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndCheckedTarInfo) as tar:
                    for member in tar:
                        if not member.isfile() or base + member.offset < start:
                            continue
                        folder, _, file_name = member.name.rpartition("/")
                        stem, _, extension = file_name.partition(".")
                        extension = extension.lower()
                        if extension not in IMAGE_EXTENSIONS and extension != "txt":
                            continue
                        member_key = f"{folder}/{stem}" if folder else stem
                        if member_key != key:
                            if key is not None:
                                yield key, members, base + member.offset
                            key, members = member_key, {}
                        members[extension] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            if skips is not None:
                detail = f"rest of shard dropped, {type(error).__name__}: {error}"
                skips.add("unreadable_shard", self.name, shard, key or "(first member)", detail)
            return  # the sample being read when the error hit is incomplete: drop it
        if key is not None:
            yield key, members, None

    def _to_record(self, shard: str, key: str, members: dict[str, bytes]) -> PairRecord:
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        text = members.get("txt")
        caption = None if text is None else text.decode("utf-8", errors="replace")
        return PairRecord(image, caption, self.name, shard, key)


class CocoCaptionSource:
    """COCO captions: `captions_*.json` (`images` + `annotations`) and the image folder; one example per caption.

    The annotation index (file names and captions, not images) is held in memory; readers take fixed strided
    slices of a seeded permutation, reshuffled within the slice per epoch.
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, name: str = "coco") -> None:
        annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        if annotation_file.is_dir():
            raise IsADirectoryError(
                f"COCO annotation file {str(annotation_file)!r} is a folder; give the JSON file, e.g. captions_train2017.json"
            )
        if not annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {str(annotation_file)!r}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {str(self.image_dir)!r}")
        self.location = str(annotation_file)
        data = read_json(annotation_file)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise ValueError(f"{self.location!r} is not a COCO captions file: needs 'images' and 'annotations'")
        images = self._entries(data, "images", ("id", "file_name"))
        file_names = {image["id"]: image["file_name"] for image in images}
        annotations = self._entries(data, "annotations", ("id", "image_id"))
        # A caption that is missing is a counted skip when read (`_make_pair`), like an empty one.
        self.pairs = [(file_names.get(a["image_id"]), a.get("caption"), str(a["id"])) for a in annotations]
        self.name = name

    def _entries(self, data: dict[str, Any], section: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
        """`data[section]`, each record an object with `fields`; else a `ValueError` naming the file and record."""
        entries = data[section]
        if not isinstance(entries, list):
            raise ValueError(f"{self.location!r}: {section!r} is {type(entries).__name__}, not a list of records")
        for index, entry in enumerate(entries):
            missing = [f for f in fields if f not in entry] if isinstance(entry, dict) else list(fields)
            if missing:
                raise ValueError(
                    f"{self.location!r}: {section} record {index} ({str(entry)[:80]}) lacks {', '.join(missing)}; "
                    f"every COCO {section} record is an object with {', '.join(fields)}."
                )
        return entries

    def records(
        self, part: Partition, seed: int, epoch: int, skips: SkipCounter, cursor: Cursor = None
    ) -> Iterator[tuple[Cursor, PairRecord]]:
        """Cursor: captions taken this pass."""
        mine = _permutation(len(self.pairs), seed)[part.index :: part.count]
        order = _permutation(len(mine), seed, epoch, part.index)
        for position in range(cursor or 0, len(order)):
            file_name, caption, key = self.pairs[mine[order[position]]]
            image = None if file_name is None else str(self.image_dir / file_name)
            yield position + 1, PairRecord(image, caption, self.name, self.location, key)


class HFPairSource:
    """A `datasets` dataset (map-style or streaming) with an image column and a text column.

    Images are read undecoded (`Image(decode=False)`) and decoded here, so that one corrupt image is a counted
    skip instead of an exception inside `datasets`. A text cell that is a list gives one example per caption.
    Order is the dataset's own (shuffle it beforehand, or use `MixedPairDataset(shuffle_buffer=…)`).
    """

    def __init__(
        self,
        dataset: datasets.Dataset | datasets.IterableDataset,
        image_column: str = "image",
        text_column: str = "text",
        name: str = "hf",
    ) -> None:
        columns = dataset.column_names
        for column in (image_column, text_column):
            if columns is not None and column not in columns:
                raise ValueError(f"Dataset {name!r} has no column {column!r}; its columns are {columns}")
        if dataset.features is not None and isinstance(dataset.features.get(image_column), datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset, self.image_column, self.text_column, self.name = dataset, image_column, text_column, name

    @classmethod
    def load(
        cls,
        path: str,
        image_column: str = "image",
        text_column: str = "text",
        *,
        data_dir: str | None = None,
        split: str = "train",
        name: str | None = None,
        **load_kwargs: Any,
    ) -> HFPairSource:
        """`datasets.load_dataset(path, data_dir=…, split=…, streaming=True)` wrapped as a pair source: streamed, so
        that a large dataset is neither copied into the cache nor held in memory."""
        if data_dir is not None and not os.path.isdir(data_dir):
            raise FileNotFoundError(f"data_dir for dataset {path!r} not found: {data_dir!r}")
        dataset = datasets.load_dataset(path, data_dir=data_dir, split=split, streaming=True, **load_kwargs)
        return cls(dataset, image_column, text_column, name or Path(data_dir or path).name)

    def records(
        self, part: Partition, seed: int, epoch: int, skips: SkipCounter, cursor: Cursor = None
    ) -> Iterator[tuple[Cursor, PairRecord]]:
        """Cursor: (rows taken, the streaming dataset's own `state_dict` after them or None, captions of the next
        row already taken)."""
        taken, stream_state, first_caption = cursor or (0, None, 0)
        if isinstance(self.dataset, datasets.Dataset):
            indices = range(part.index, len(self.dataset), part.count)
            rows: Iterable[tuple[str, dict, Any]] = (
                (str(indices[n]), self.dataset[indices[n]], None) for n in range(taken, len(indices))
            )
        else:
            shard = split_dataset_by_node(self.dataset, rank=part.index, world_size=part.count)
            if stream_state is not None:
                shard.load_state_dict(stream_state)  # datasets resumes at its shard and offset
            # .iter() rather than iter(): the latter would split again by DataLoader worker, which `part` already does
            batches = shard.iter(batch_size=1)
            rows = (
                (f"{part.index}:{n}", {k: v[0] for k, v in batch.items()}, shard.state_dict())
                for n, batch in enumerate(batches, start=taken)
            )
        for row_key, row, state_after in rows:
            image, key = self._image_and_key(row[self.image_column], row_key)
            texts = row[self.text_column]
            captions = [(f"{key}#{j}", t) for j, t in enumerate(texts)] if isinstance(texts, list) else [(key, texts)]
            for j in range(first_caption, len(captions)):
                caption_key, caption = captions[j]
                done = j + 1 == len(captions)
                after = (taken + 1, state_after, 0) if done else (taken, stream_state, j + 1)
                yield after, PairRecord(image, caption, self.name, self.name, caption_key)
            taken, stream_state, first_caption = taken + 1, state_after, 0

    @staticmethod
    def _image_and_key(cell: Any, row_key: str) -> tuple[bytes | str | Image.Image | None, str]:
        """Undecoded image cell (`{"bytes", "path"}`, path, bytes or PIL) → decodable data and a readable key."""
        if isinstance(cell, dict):
            path = cell.get("path")
            return (cell.get("bytes") or path), (path or row_key)
        if isinstance(cell, str):
            return cell, cell
        return cell, row_key


# --------------------------------------------------------------------------------------------------- specs


_SPEC_FORMATS = (
    "[NAME=]wds:PATTERN[::PATTERN...] | [NAME=]coco:ANNOTATION_JSON:IMAGE_DIR | "
    "[NAME=]hf:PATH[:DATA_DIR]:IMAGE_COLUMN:TEXT_COLUMN[@SPLIT]"
)
_SPEC_RE = re.compile(r"^(?:(?P<name>[\w.-]+)=)?(?P<kind>[A-Za-z]+):(?P<rest>.*)$", re.DOTALL)


@dataclass(frozen=True)
class PairSourceSpec:
    """What a source is, as the training script receives it (`parse`) or as code builds it directly.

    kind "wds": `path` = shard patterns joined by `::`. kind "coco": `path` = annotation json, `image_dir`.
    kind "hf": `path` = dataset path or builder name (`imagefolder`), optional `data_dir`, columns, split.
    """

    kind: Literal["wds", "coco", "hf"]
    path: str
    image_dir: str | None = None
    data_dir: str | None = None
    image_column: str = "image"
    text_column: str = "text"
    split: str = "train"
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> PairSourceSpec:
        """Parse `[NAME=]KIND:ARGS` (formats in the module docstring); raises `ValueError` naming the spec."""
        match = _SPEC_RE.match(text.strip())
        if match is None or not match["rest"]:
            raise ValueError(f"Cannot parse image-text source {text!r}; expected one of: {_SPEC_FORMATS}")
        kind, rest, name = match["kind"].lower(), match["rest"], match["name"]
        if kind == "wds":
            if any(not p for p in rest.split("::")):
                raise ValueError(f"Empty shard pattern in source {text!r}; expected [NAME=]wds:PATTERN[::PATTERN...]")
            return cls("wds", rest, name=name)
        if kind == "coco":
            fields = rest.split(":")
            if len(fields) != 2 or not all(fields):
                raise ValueError(f"Cannot parse COCO source {text!r}; expected [NAME=]coco:ANNOTATION_JSON:IMAGE_DIR")
            return cls("coco", fields[0], image_dir=fields[1], name=name)
        if kind == "hf":
            rest, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "train")
            fields = rest.split(":")
            if len(fields) not in (3, 4) or not all(fields) or (at and not split):
                raise ValueError(
                    f"Cannot parse datasets source {text!r}; expected "
                    "[NAME=]hf:PATH[:DATA_DIR]:IMAGE_COLUMN:TEXT_COLUMN[@SPLIT]"
                )
            path, *data_dir, image_column, text_column = fields
            return cls(
                "hf",
                path,
                data_dir=data_dir[0] if data_dir else None,
                image_column=image_column,
                text_column=text_column,
                split=split,
                name=name,
            )
        raise ValueError(f"Unknown source kind {kind!r} in {text!r}; expected one of: {_SPEC_FORMATS}")

    def build(self) -> PairSource:
        """Open the source; wrong paths raise here (`FileNotFoundError`), before any training starts."""
        if self.kind == "wds":
            return WebDatasetSource(self.path, self.name)
        if self.kind == "coco":
            if self.image_dir is None:
                raise ValueError(f"COCO source {self.path!r} needs image_dir")
            return CocoCaptionSource(self.path, self.image_dir, self.name or "coco")
        if self.kind == "hf":
            return HFPairSource.load(
                self.path,
                self.image_column,
                self.text_column,
                data_dir=self.data_dir,
                split=self.split,
                name=self.name,
            )
        raise ValueError(f"Unknown source kind {self.kind!r}; expected 'wds', 'coco' or 'hf'")


# --------------------------------------------------------------------------------------------------- mixing


class MixedPairDataset(IterableDataset):
    """Several pair sources mixed with fixed probabilities, as one `torch.utils.data.IterableDataset`.

    Each reader (rank × DataLoader worker, see `current_partition`) reads only its own share of every source,
    and draws the next source from its own generator seeded by (seed, epoch, reader): the stream is a
    deterministic function of the seed and the reader layout. `infinite=True` restarts exhausted sources (a new
    pass reshuffles them), the usual setting for step-based pre-training (paper §4.2: 100k steps);
    `infinite=False` reads every source once, drawing among those not yet exhausted. Each yielded example is
    `{"image": PIL RGB, "caption", "source", "key", "stream_position": (reader, n)}`. `state_dict` and
    `load_state_dict` make it resumable (see the module docstring).
    """

    def __init__(
        self,
        sources: Sequence[PairSource],
        probabilities: Sequence[float] | None = None,
        seed: int = 0,
        *,
        infinite: bool = True,
        shuffle_buffer: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        skips: SkipCounter | None = None,
    ) -> None:
        if not sources:
            raise ValueError("MixedPairDataset needs at least one source")
        probabilities = [1.0] * len(sources) if probabilities is None else [float(p) for p in probabilities]
        if len(probabilities) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(probabilities)} probabilities: {probabilities}")
        if not all(np.isfinite(p) and p > 0 for p in probabilities):
            raise ValueError(f"Source probabilities must be positive numbers, got {probabilities}")
        if (rank is None) != (world_size is None) or (rank is not None and not 0 <= rank < world_size):
            raise ValueError(f"Give both rank and world_size (0 <= rank < world_size), got {rank=}, {world_size=}")
        self.sources = list(sources)
        self.probabilities = [p / sum(probabilities) for p in probabilities]
        self.seed, self.infinite = seed, infinite
        self.shuffle_buffer, self.rank, self.world_size = shuffle_buffer, rank, world_size
        self.skips = skips if skips is not None else SkipCounter()
        self.epoch = 0
        self._reader: _ReaderState | None = None
        self._resume_from: dict[str, Any] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for a new epoch (call before iterating, on every rank). The Trainer's data loader calls it at the
        start of every epoch on any dataset that has it."""
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """This reader's position (called in each DataLoader worker by `torchdata`'s `StatefulDataLoader`).

        Per source the pass and the cursor within it (shard and byte offset, row, `datasets` state), the mixing
        and shuffling RNG, the shuffle buffer as undecoded records, the examples yielded so far (which seed their
        crops and masks, see `PretrainCollator`) and this process's skip counts. Before iterating: the state
        about to be resumed from, or a fresh start.
        """
        if self._reader is None:
            return self._resume_from or {"reader": None}
        reader = self._reader
        return {
            "reader": reader.part.index,
            "readers": reader.part.count,
            "epoch": self.epoch,
            "rng": reader.rng.bit_generator.state,
            "passes": list(reader.passes),
            "cursors": list(reader.cursors),
            "active": list(reader.active),
            "buffer": [record for record, _ in reader.buffer],
            "yielded": reader.yielded,
            "skips": self.skips.row_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration continue from `state` (a `state_dict()` of the same stream and reader layout)."""
        self._resume_from = state if state.get("reader") is not None else None
        self._reader = None

    def __iter__(self) -> Iterator[Example]:
        part = current_partition(self.rank, self.world_size)
        reader = self._start_reader(part)
        self._reader = reader
        streams = [self._source_stream(i, reader) for i in range(len(self.sources))]
        stream = self._mix(streams, reader)
        if self.shuffle_buffer > 1:
            stream = self._buffer_shuffle(stream, reader)
        for _, example in stream:
            # The position seeds this example's crop and masks (PretrainCollator): resumable without any counter.
            example = {**example, "stream_position": (part.index, reader.yielded)}
            reader.yielded += 1
            yield example

    def _start_reader(self, part: Partition) -> _ReaderState:
        state, self._resume_from = self._resume_from, None
        if state is None:
            return _ReaderState(
                part, np.random.default_rng((self.seed, self.epoch, part.index)), [0] * len(self.sources),
                [None] * len(self.sources), list(range(len(self.sources))),
            )
        if (state["reader"], state["readers"]) != (part.index, part.count):
            raise ValueError(
                f"The saved pair stream was read as reader {state['reader']} of {state['readers']} (ranks × DataLoader "
                f"workers), this one is reader {part.index} of {part.count}: resume with the same number of processes "
                "and --dataloader_num_workers, or pass --ignore_data_skip to start the stream afresh."
            )
        self.epoch = state["epoch"]
        self.skips.load_row_state(state["skips"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        # Buffered records were decodable when saved; decoding them again is the only image work of a resume.
        buffer = [(record, pair) for record in state["buffer"] if (pair := _make_pair(record, self.skips)) is not None]
        return _ReaderState(
            part, rng, list(state["passes"]), list(state["cursors"]), list(state["active"]), buffer, state["yielded"]
        )

    def _mix(self, streams: list[Iterator[tuple[PairRecord, Example]]], reader: _ReaderState):
        while reader.active:
            weights = np.array([self.probabilities[i] for i in reader.active])
            chosen = reader.active[reader.rng.choice(len(reader.active), p=weights / weights.sum())]
            item = next(streams[chosen], None)
            if item is None:
                reader.active.remove(chosen)
            else:
                yield item

    def _source_stream(self, index: int, reader: _ReaderState) -> Iterator[tuple[PairRecord, Example]]:
        source = self.sources[index]
        while True:
            fresh_pass, produced = reader.cursors[index] is None, False
            epoch = self.epoch + reader.passes[index]
            for cursor, record in source.records(reader.part, self.seed, epoch, self.skips, reader.cursors[index]):
                reader.cursors[index] = cursor
                pair = _make_pair(record, self.skips)
                if pair is not None:
                    produced = True
                    yield record, pair
            if not self.infinite:
                return
            if fresh_pass and not produced:
                # restarting would spin forever: every pair was skipped, or this reader's share is empty
                raise RuntimeError(
                    f"Source {source.name!r} gave no usable pair to reader {reader.part.index} of "
                    f"{reader.part.count} (skips so far: {self.skips.summary()})"
                )
            reader.passes[index] += 1
            reader.cursors[index] = None

    def _buffer_shuffle(self, stream: Iterator[tuple[PairRecord, Example]], reader: _ReaderState):
        """Approximate shuffle of a stream with a `shuffle_buffer`-element buffer (sources are read shard by
        shard). The buffer lives in the reader's state, so a checkpoint holds it."""
        buffer, size = reader.buffer, self.shuffle_buffer
        for item in stream:
            if len(buffer) < size:
                buffer.append(item)
                continue
            i = int(reader.rng.integers(size))
            out, buffer[i] = buffer[i], item
            yield out
        while buffer:
            yield buffer.pop(int(reader.rng.integers(len(buffer))))


@dataclass
class _ReaderState:
    """What one reader of a `MixedPairDataset` has consumed; `MixedPairDataset.state_dict` saves it."""

    part: Partition
    rng: np.random.Generator
    passes: list[int]
    cursors: list[Cursor]
    active: list[int]
    buffer: list[tuple[PairRecord, Example]] = field(default_factory=list)
    yielded: int = 0


def parse_probabilities(text: str | Sequence[float] | None) -> list[float] | None:
    """`"0.2,0.8"` or `"0.2 0.8"` (or a sequence) → floats; they are normalised later, so weights work too."""
    if text is None or not isinstance(text, str):
        return None if text is None else [float(p) for p in text]
    try:
        return [float(p) for p in re.split(r"[,\s]+", text.strip()) if p]
    except ValueError:
        raise ValueError(f"Cannot parse source probabilities {text!r}; expected e.g. '0.2,0.8'") from None


def build_pair_dataset(
    sources: str | Sequence[PairSourceSpec | str],
    probabilities: str | Sequence[float] | None = None,
    seed: int = 0,
    *,
    infinite: bool = True,
    shuffle_buffer: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    skips: SkipCounter | None = None,
    flag: str = "--train_sources",
) -> MixedPairDataset:
    """The pre-training pair stream from command-line strings or specs.

    `sources`: specs (`PairSourceSpec` or strings in the module docstring's format), or one string with specs
    separated by `;`. `probabilities`: one per source (`"0.2,0.8"`), default uniform. The released mixture is
    `build_pair_dataset(["coco:…", "wds:cc…::sbu…"], "0.2,0.8")`. `rank`/`world_size` default to
    `torch.distributed`'s at iteration time. Paths and files are checked here, and a spec or file that is wrong
    is a `ValueError` naming `flag`; see `MixedPairDataset` for the rest.
    """
    if isinstance(sources, str):
        sources = [s for s in sources.split(";") if s.strip()]
    try:
        built = [(s if isinstance(s, PairSourceSpec) else PairSourceSpec.parse(s)).build() for s in sources]
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from error
    return MixedPairDataset(
        built,
        parse_probabilities(probabilities),
        seed,
        infinite=infinite,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        skips=skips,
    )
