"""Pre-tokenised data: ``deltamoe data pack CONFIG.yaml OUT`` and the packed training stream.

Packing tokenises every source of a training config once, in worker processes, and writes per
source and split (``train``: the documents the stream trains on; ``heldout``: the held-out ones
and eval-only sources) three memory-mapped arrays:

- ``source-NNN.SPLIT.tokens``: the token ids of every document, end to end (uint32);
- ``source-NNN.SPLIT.index``: document offsets into the tokens (int64, documents + 1);
- ``source-NNN.SPLIT.langs``: each document's language (int16 index into the manifest's
  ``languages``; -1 = untagged).

``manifest.json`` records the tokenizer's digest, the sources (their settings and the sha256 of
their files), the seed, ``heldout_fraction`` and ``add_eos`` (the settings that decide which
documents train and how they tokenise) and the size of every array. Mixing, token budgets, the
shuffle buffer and ``seq_len`` stay training settings: :class:`PackedStream` replays the same
mixing as :class:`deltamoe.train.data.TrainStream` over the packed documents, so a config gives
the same sequences from the raw sources and from their pack (tested). Its buffer holds spans of
the arrays, not tokens: each process reads only the tokens of its own rows, and a position in a
source is a document number (resuming seeks, it does not replay).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltamoe.errors import DataError, UsageError
from deltamoe.train import data as D
from deltamoe.train.sections import DataConfig, SourceConfig
from deltamoe.train.sources import Languages

FORMAT = "deltamoe-pack"
VERSION = 2  # 2: the tokenizer digest leaves out padding and truncation state
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
_ARRAYS = {"tokens": np.uint32, "index": np.int64, "langs": np.int16}
_CHUNK = 256  # documents per work item
# source settings that decide its documents; weights and budgets are mixing, free at training time
_IDENTITY = ("path", "format", "lang", "text_field", "lang_field", "sample_by", "split", "eval_only")


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the fast tokenizer's definition and its EOS.

    The backend's padding and truncation settings are left out: they are call state, not the
    tokenizer (a padded call switches them on in the Rust backend and they stay), and packing
    encodes every document unpadded and untruncated."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"packing needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} is not one")
    definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    spec = {"tokenizer": definition, "eos": tokenizer.eos_token_id, "class": type(tokenizer).__name__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _source_files(src: SourceConfig) -> list[Path]:
    if any(c in src.path for c in "*?["):
        return sorted(Path(p) for p in glob.glob(src.path, recursive=True) if Path(p).is_file())
    path = Path(src.path)
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(src: SourceConfig) -> dict[str, Any]:
    return {**{k: getattr(src, k) for k in _IDENTITY}, "path": os.path.abspath(src.path)}


def _ordered_map(pool: Any, fn: Any, items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``pool.map`` with at most ``depth`` items in flight (a corpus need not fit in memory)."""
    from collections import deque

    pending: deque[Any] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -- packing ---------------------------------------------------------------------------------
_worker_tok: D.Tokenize | None = None


def _init_worker(tokenizer_path: str, add_eos: bool) -> None:
    global _worker_tok
    from transformers import AutoTokenizer

    _worker_tok = D.Tokenize(AutoTokenizer.from_pretrained(tokenizer_path), add_eos)


def _tokenize_chunk(chunk: list[tuple[str, int, bool]]) -> list[tuple[np.ndarray, int, bool]]:
    assert _worker_tok is not None
    return [(np.asarray(_worker_tok(text), dtype=np.uint32), lang, held) for text, lang, held in chunk]


def _chunks(src: SourceConfig, langs: Languages, cfg: DataConfig, seed: int) -> Iterator[list[tuple[str, int, bool]]]:
    """(text, language, held out) of every record, in order, in chunks."""
    doc = D._Doc(src, langs)
    chunk: list[tuple[str, int, bool]] = []
    for k, rec in enumerate(D._records(src, 0)):
        text, lang = doc(rec, k)
        chunk.append((text, lang, src.eval_only or D.is_heldout(seed, text, cfg.heldout_fraction)))
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Writer:
    """Appends documents of one source and split to its three files."""

    def __init__(self, out: Path, stem: str):
        self.files = {k: open(out / f"{stem}.{k}", "wb") for k in _ARRAYS}
        self.tokens = self.docs = 0
        self.files["index"].write(np.zeros(1, dtype=np.int64).tobytes())

    def add(self, ids: np.ndarray, lang: int) -> None:
        self.files["tokens"].write(ids.tobytes())
        self.tokens += len(ids)
        self.docs += 1
        self.files["index"].write(np.array([self.tokens], dtype=np.int64).tobytes())
        self.files["langs"].write(np.array([lang], dtype=np.int16).tobytes())

    def close(self) -> dict[str, int]:
        for f in self.files.values():
            f.close()
        return {"docs": self.docs, "tokens": self.tokens}


def pack(
    config: str | os.PathLike[str] | dict[str, Any],
    out: str | os.PathLike[str],
    *,
    workers: int | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Tokenise the sources of a training config once into a packed dataset at ``out``."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    from deltamoe.io import atomic_output_dir, check_output

    cfg, model_tok, langs = _setup(config)
    if tokenizer is not None and tokenizer_digest(_load_tokenizer(Path(tokenizer))) != tokenizer_digest(model_tok):
        raise DataError(
            f"--tokenizer {tokenizer}: differs from the tokenizer of the model {cfg.model}; a pack must be "
            "tokenised with the model's own tokenizer"
        )
    out_path = check_output(out, force=force)
    workers = max(1, workers or os.cpu_count() or 1)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer": {"sha256": tokenizer_digest(model_tok), "vocab": len(model_tok), "from": cfg.model},
        "languages": langs.names,
        "seed": cfg.seed,
        "heldout_fraction": cfg.data.heldout_fraction,
        "add_eos": cfg.data.add_eos,
        "sources": [],
    }
    bar = tqdm(desc="packing", unit=" docs", disable=not progress)
    pool = ProcessPoolExecutor(workers, initargs=(cfg.model, cfg.data.add_eos), initializer=_init_worker)
    try:
        with atomic_output_dir(out_path, force=force) as tmp:
            for i, src in enumerate(cfg.data.sources):
                writers = {split: _Writer(tmp, f"source-{i:03d}.{split}") for split in SPLITS}
                for done in _ordered_map(pool, _tokenize_chunk, _chunks(src, langs, cfg.data, cfg.seed), 4 * workers):
                    for ids, lang, held in done:
                        if len(ids):  # an empty document is never trained on nor evaluated
                            writers["heldout" if held else "train"].add(ids, lang)
                    bar.update(len(done))
                counts = {split: w.close() for split, w in writers.items()}
                files = {str(p): _sha256(p) for p in _source_files(src)}
                manifest["sources"].append({"source": _identity(src), "sha256": files, **counts})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        pool.shutdown()
        bar.close()
    return out_path


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DataError(f"{path}: no usable tokenizer files ({type(e).__name__}: {e})") from None


def _setup(config: str | os.PathLike[str] | dict[str, Any]) -> tuple[Any, Any, Languages]:
    """The training config, its model's tokenizer and its languages."""
    from deltamoe.io import open_checkpoint
    from deltamoe.io.provenance import read_manifest
    from deltamoe.train.config import load_config

    cfg = load_config(config)
    if cfg.data.pack:
        raise UsageError("data.pack is set: pack a config that reads raw sources (drop data.pack)")
    ckpt = open_checkpoint(cfg.model)
    langs = languages(cfg, (read_manifest(ckpt.path) or {}).get("moe"))
    D.check_sources(cfg.data, langs)
    return cfg, _load_tokenizer(ckpt.path), langs


def languages(cfg: Any, moe: Mapping[str, Any] | None) -> Languages:
    """The languages of a stage: the MoE's allocation, or the sources' tags for a dense model."""
    if not moe:
        tags = sorted({s.lang for s in cfg.data.sources if s.lang} | set(cfg.data.languages))
        return Languages({tag: [] for tag in tags}, kind="sources")
    return Languages({k: list(v) for k, v in (moe.get("allocation") or {}).items()})


# -- reading -----------------------------------------------------------------------------------
@dataclass
class _Split:
    tokens: np.ndarray
    index: np.ndarray
    langs: np.ndarray


class Pack:
    """A packed dataset, checked completely before training starts."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.manifest = self._read_manifest()
        self.splits: list[dict[str, _Split]] = [
            {split: self._open(i, split, entry[split]) for split in SPLITS}
            for i, entry in enumerate(self.manifest["sources"])
        ]

    def _read_manifest(self) -> dict[str, Any]:
        p = self.path / MANIFEST
        if not p.is_file():
            raise DataError(f"data.pack: {self.path} is not a packed dataset (no {MANIFEST}; make one with deltamoe data pack)")
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"data.pack: {p} is corrupt ({type(e).__name__}: {e}); pack again") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
            raise DataError(f"data.pack: {p} is not a {FORMAT} version {VERSION} manifest; pack again")
        return m

    def _open(self, i: int, split: str, counts: Mapping[str, int]) -> _Split:
        arrays = {}
        sizes = {"tokens": counts["tokens"], "index": counts["docs"] + 1, "langs": counts["docs"]}
        for kind, dtype in _ARRAYS.items():
            f = self.path / f"source-{i:03d}.{split}.{kind}"
            expected = sizes[kind] * np.dtype(dtype).itemsize
            got = f.stat().st_size if f.is_file() else None
            if got != expected:
                what = "missing" if got is None else f"{got} bytes, the manifest says {expected}"
                raise DataError(f"data.pack: {f} is truncated or corrupt ({what}); pack again")
            arrays[kind] = np.memmap(f, dtype=dtype, mode="r") if expected else np.zeros(0, dtype=dtype)
        s = _Split(**arrays)
        if s.index[0] != 0 or s.index[-1] != len(s.tokens) or (np.diff(s.index) <= 0).any():
            raise DataError(f"data.pack: source-{i:03d}.{split}.index is corrupt (offsets not increasing); pack again")
        vocab = self.manifest["tokenizer"]["vocab"]
        if len(s.tokens) and int(s.tokens.max()) >= vocab:
            raise DataError(f"data.pack: source-{i:03d}.{split}.tokens is corrupt (ids >= vocabulary {vocab}); pack again")
        return s

    def check(self, cfg: DataConfig, seed: int, tokenizer: Any, langs: Languages) -> None:
        """The pack must hold this config's documents, tokenised by this model's tokenizer."""
        m = self.manifest
        if m["tokenizer"]["sha256"] != tokenizer_digest(tokenizer):
            raise DataError(
                f"data.pack: {self.path} was tokenised with another tokenizer (from {m['tokenizer']['from']}) "
                "than this model's; pack the data with this model"
            )
        mine = {"seed": seed, "heldout_fraction": cfg.heldout_fraction, "add_eos": cfg.add_eos,
                "languages": langs.names}
        for key, value in mine.items():
            if m[key] != value:
                raise DataError(f"data.pack: packed with {key} = {m[key]!r}, this run has {value!r}; pack again")
        packed = [e["source"] for e in m["sources"]]
        wanted = [_identity(s) for s in cfg.sources]
        if packed != wanted:
            raise DataError(
                f"data.pack: {self.path} holds other sources than data.sources (packed: "
                f"{[s['path'] for s in packed]}); give the sources it was packed from, in the same order"
            )

    def heldout(self, cfg: DataConfig) -> D.HeldOut:
        """The held-out sequences, as :func:`deltamoe.train.data.build_heldout` makes them."""
        out = D.HeldOut([], [], [])
        for si, src in enumerate(cfg.sources):
            if cfg.heldout_max_tokens == 0 or (cfg.heldout_fraction == 0 and not src.eval_only):
                continue
            s = self.splits[si]["heldout"]
            n = min(len(s.tokens), cfg.heldout_max_tokens)
            ids = s.tokens[:n].astype(np.int64).tolist()
            doc_of = np.searchsorted(s.index, np.arange(n), side="right") - 1
            lang_ids = s.langs[doc_of].astype(np.int64).tolist()
            for i in range(0, n, cfg.seq_len):
                if len(ids[i : i + cfg.seq_len]) > 1:
                    out.ids.append(ids[i : i + cfg.seq_len])
                    out.langs.append(lang_ids[i : i + cfg.seq_len])
                    out.source.append(si)
        return out


class _Span:
    """Tokens [start, end) of one packed document; read from the memory map only when needed."""

    __slots__ = ("split", "ref", "start", "end")

    def __init__(self, split: _Split, ref: tuple[int, int], start: int, end: int):
        self.split, self.ref, self.start, self.end = split, ref, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, s: slice) -> _Span:
        lo, hi, _ = s.indices(len(self))
        return _Span(self.split, self.ref, self.start + lo, self.start + max(lo, hi))

    def read(self) -> torch.Tensor:
        return torch.from_numpy(self.split.tokens[self.start : self.end].astype(np.int64))


class PackedStream(D.TrainStream):
    """:class:`deltamoe.train.data.TrainStream` over a pack: the same mixing, shuffle and packing."""

    def __init__(self, cfg: DataConfig, pack: Pack, tokenizer: Any, langs: Languages, seed: int):
        super().__init__(cfg, tokenizer, langs, seed)
        self.pack = pack

    def _next_doc(self, i: int) -> tuple[Any, int]:
        s = self.pack.splits[i]["train"]
        cur = self.cursor[i]
        if cur["record"] >= len(s.langs):  # end of an epoch
            if len(s.langs) == 0:
                raise DataError(
                    f"source {self.cfg.sources[i].path}: no training documents in the pack (every document is "
                    "held out; lower data.heldout_fraction and pack again)"
                )
            cur["epoch"] += 1
            cur["record"] = cur["docs"] = 0
        k = cur["record"]
        cur["record"] += 1
        cur["docs"] += 1
        return _Span(s, (i, k), int(s.index[k]), int(s.index[k + 1])), int(s.langs[k])

    def _tokens(self, seg: Any) -> torch.Tensor:
        return seg.read()

    def _dump(self, seg: Any) -> Any:
        return [*seg.ref, seg.start, seg.end]

    def _load(self, state: Sequence[int]) -> _Span:
        i, k, start, end = state
        return _Span(self.pack.splits[i]["train"], (i, k), start, end)

    def _buf_state(self) -> dict[str, Any]:
        return {"buf": [[self._dump(seg), lang] for seg, lang in self.buf]}

    def _load_buf(self, state: Mapping[str, Any]) -> None:
        if "buf" not in state:
            raise DataError("the checkpoint's data state is of raw sources, this run reads a pack")
        self.buf.extend((self._load(seg), int(lang)) for seg, lang in state["buf"])
