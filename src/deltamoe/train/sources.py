"""Training text sources: finding and opening them, and the languages their records may carry.

Every source is read as a ``datasets`` streaming ``IterableDataset`` (jsonl, txt, parquet, or any
local path ``datasets`` can load, including ``save_to_disk`` directories), so a corpus larger
than memory works: only the records in flight are held. A record's language is an index into
the stage's :class:`Languages` (the MoE's allocation, or a dense model's source tags); -1
(:data:`UNTAGGED`) is none.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltamoe.errors import DataError
from deltamoe.train.sections import SourceConfig

UNTAGGED = -1
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".txt": "txt",
    ".txt.gz": "txt",
    ".parquet": "parquet",
}
_BUILDER = {"jsonl": "json", "txt": "text", "parquet": "parquet"}


@dataclass(frozen=True)
class Languages:
    """The languages of the model's allocation, in index order, with their experts.

    ``kind="sources"``: a dense model has no allocation; its languages are the ``lang`` tags of
    the configured sources (the experts lists are empty).
    """

    allocation: Mapping[str, Sequence[int]]
    kind: str = "allocation"

    @property
    def names(self) -> list[str]:
        return sorted(self.allocation)

    def index(self, tag: str | None, where: str) -> int:
        if tag is None:
            return UNTAGGED
        try:
            return self.names.index(tag)
        except ValueError:
            if self.kind == "sources":
                raise DataError(
                    f"{where}: language tag {tag!r} is not among the sources' languages "
                    f"({', '.join(self.names) or 'none'}); give a source lang: {tag}, or list it in data.languages"
                ) from None
            known = ", ".join(f"{k}={list(v)}" for k, v in sorted(self.allocation.items())) or "none"
            raise DataError(
                f"{where}: language tag {tag!r} is not in the model's expert allocation ({known}). "
                "Tag the data with an allocated language, drop the tag to leave it untagged, or upcycle "
                f"with --allocate {tag}=EXPERTS"
            ) from None


def source_label(src: SourceConfig) -> str:
    return f"source {src.path}"


def source_format(src: SourceConfig) -> str:
    """The format of a source, checking that its path exists."""
    path = Path(src.path)
    has_glob = any(c in src.path for c in "*?[")
    files = [Path(p) for p in glob.glob(src.path, recursive=True)] if has_glob else [path]
    if has_glob and not files:
        raise DataError(f"{source_label(src)}: the pattern matches no file")
    if not has_glob and not path.exists():
        raise DataError(f"{source_label(src)}: no such file or directory")
    if all(f.is_file() and f.stat().st_size == 0 for f in files):
        raise DataError(f"{source_label(src)}: empty corpus (the file is empty)")
    if src.format != "auto":
        return src.format
    if not has_glob and path.is_dir():
        return "datasets"
    name = path.name.lower()
    for suffix, fmt in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{source_label(src)}: cannot tell the format from the name; set format: jsonl, txt, parquet or datasets")


def open_source(src: SourceConfig) -> Any:
    """A ``datasets`` streaming dataset over the source's records."""
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    fmt = source_format(src)
    try:
        if fmt == "datasets":
            path = Path(src.path)
            if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if src.split not in ds:
                        raise DataError(f"{source_label(src)}: no split {src.split!r} (has {sorted(ds)})")
                    ds = ds[src.split]
                return ds.to_iterable_dataset()
            return datasets.load_dataset(str(path), split=src.split, streaming=True)
        kwargs: dict[str, Any] = {}
        if fmt == "txt":
            kwargs["sample_by"] = src.sample_by
        return datasets.load_dataset(_BUILDER[fmt], data_files=src.path, split="train", streaming=True, **kwargs)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for unreadable data
        raise DataError(f"{source_label(src)}: cannot read it as {fmt}: {type(e).__name__}: {e}") from None
