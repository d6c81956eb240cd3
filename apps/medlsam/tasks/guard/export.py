"""The dataset export (`GET /datastore/dataset`) as a streamed ZIP: nothing is written to disk."""

from __future__ import annotations

import json
import os
import zipfile
from typing import Iterator


class _Sink:
    """A write-only, unseekable stream that hands its bytes out as they come (zipfile copes with it)."""

    def __init__(self):
        self.chunks: list[bytes] = []

    def write(self, data) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def dataset_entries(datastore, limit_cases: int | None) -> list[tuple[str, str]]:
    """(name in the archive, file) for every image and label of the datastore's training list."""
    items = datastore.datalist()
    if limit_cases and 0 < limit_cases < len(items):
        items = items[:limit_cases]
    return [(f"{key}/{os.path.basename(path)}", path) for item in items for key, path in item.items()
            if isinstance(path, str) and os.path.isfile(path)]


def stream_zip(entries: list[tuple[str, str]], metadata: dict) -> Iterator[bytes]:
    """ZIP (stored, ZIP64) of `entries` plus metadata.json, yielded in pieces of about 1 MB."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, path in entries:
            with open(path, "rb") as src, archive.open(name, "w", force_zip64=True) as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    yield sink.take()
        archive.writestr("metadata.json", json.dumps(metadata, default=str))
    yield sink.take()
