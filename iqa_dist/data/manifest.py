"""The packed format that readers depend on: a folder of ``NAME-00000.tar`` shards with a
Parquet manifest of one row per image (``COLUMNS``, plus a ``split_<r>`` column per seeded
split round). ``pack`` writes it, the stream and the tools read it; neither knows the other."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic

MANIFEST = "manifest.parquet"
SPLITS = ("train", "val", "test")
# One row per image; the values of the ``split_<r>`` columns are SPLITS
COLUMNS = {
    "key": "image id, unique in the set; the sample's name in its shard",
    "path": "the image file packed, as the reader found it",
    "label": "MOS or DMOS, on the card's scale",
    "std": "the label's standard deviation, where the set has one",
    "ref": "the reference (pristine) image's id; the image's own key for authentic sets",
    "distortion": "distortion type, for synthetic sets",
    "level": "distortion level, for synthetic sets",
    "official_split": "the set's published split, where it has one",
    "width": "stored pixels", "height": "stored pixels",
    "format": "the stored image's extension in the shard",
    "sha1": "of the stored image bytes",
    "shard": "the shard that holds the image, relative to the manifest",
    "shard_sha1": "of the whole shard file: a copy staged from a URL is checked against it",
    "note": "what packing changed, e.g. a conversion",
}


class ManifestError(ValueError):
    """A manifest that cannot be read; the message is one line naming it."""


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(rows: list[dict], out: Path) -> None:
    path = out / MANIFEST
    with atomic.temporary(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        atomic.replace(tmp, path)


def read_manifest(shards: str | Path) -> list[dict]:
    path = Path(shards) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; pack the data set first (python -m iqa_dist.pack)")
    return read_rows(path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a manifest file, whatever its name (a download checks its temporary)."""
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:  # torn or overwritten by something else
        raise ManifestError(f"{path}: unreadable manifest ({str(err).splitlines()[0]}); "
                            "pack the data set again") from None
