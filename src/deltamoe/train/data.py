"""Language-tagged training data: mixing, tokenisation, packing, held-out split.

The sources themselves are found and opened by deltamoe.train.sources, as streaming datasets.
A record is a document with a text and a language tag (the record's own ``lang`` field, else
the source's ``lang``, else none). Documents are tokenised with the model's tokenizer (with its
own special tokens, plus EOS), then packed end to end into fixed-length sequences; every token
carries the index of its document's language (-1 = untagged), which the LPR loss and the
routing statistics use.

Held-out split: a document is held out when a seeded hash of its text falls below
``heldout_fraction`` (or always, for an ``eval_only`` source). The choice does not depend on
reading order, so the training stream skips exactly the held-out documents without keeping a
list of them, and duplicates never straddle the split. At most ``heldout_max_tokens`` per source
are kept for evaluation.

Mixing: by weight (each next document comes from a source drawn with probability proportional
to its weight; sources repeat in epochs) or by token budget (each source contributes exactly its
budget, interleaved in proportion; a smaller source repeats). An optional shuffle buffer
mixes documents of a source that is sorted (e.g. one jsonl with all of one language first).
The stream is a deterministic function of the seed, and its position
(:meth:`TrainStream.state_dict`) is a small JSON object, so resuming reproduces the same
sequences. Every process reads the same global stream and takes its own slice of each global
batch, so the result does not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltamoe.errors import DataError
from deltamoe.train.sections import DataConfig, SourceConfig
from deltamoe.train.sources import Languages, open_source, source_label

_PREFLIGHT_RECORDS = 1000


def _records(src: SourceConfig, start: int) -> Iterator[dict[str, Any]]:
    ds = open_source(src)
    if start:
        ds = ds.skip(start)
    it = iter(ds)
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{source_label(src)}: reading failed: {type(e).__name__}: {e}") from None
        yield rec


class _Doc:
    """Turns records of one source into (text, language index); checks fields and tags."""

    def __init__(self, src: SourceConfig, langs: Languages):
        self.src = src
        self.langs = langs
        self.default = langs.index(src.lang, f"{source_label(src)} (lang)")

    def __call__(self, rec: Mapping[str, Any], k: int) -> tuple[str, int]:
        src = self.src
        if src.text_field not in rec:
            raise DataError(
                f"{source_label(src)}: record {k} has no field {src.text_field!r} (fields: {sorted(rec)}); "
                "set text_field"
            )
        text = rec[src.text_field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{source_label(src)}: record {k}: {src.text_field!r} is {type(text).__name__}, not text")
        lang = self.default
        if src.lang_field and rec.get(src.lang_field) not in (None, ""):
            lang = self.langs.index(str(rec[src.lang_field]), f"{source_label(src)}, record {k}")
        return text or "", lang


def is_heldout(seed: int, text: str, fraction: float) -> bool:
    """Seeded choice of held-out documents by a hash of their text.

    It depends neither on reading order nor on position, and duplicates of a held-out document
    are held out too (no exact-copy leakage from training into evaluation).
    """
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


class Tokenize:
    """Document text -> token ids with the model's tokenizer (its own special tokens, plus EOS)."""

    def __init__(self, tokenizer: Any, add_eos: bool):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id if add_eos else None

    def __call__(self, text: str) -> list[int]:
        if not text:
            return []
        ids = list(self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids


def check_sources(cfg: DataConfig, langs: Languages) -> None:
    """Fail early on a missing, unreadable or empty source, a missing text field or a bad tag.

    Reads the first records of each source (the rest is checked as it streams).
    """
    for src in cfg.sources:
        doc = _Doc(src, langs)
        n = nonempty = 0
        for k, rec in enumerate(_records(src, 0)):
            text, _ = doc(rec, k)
            n += 1
            nonempty += bool(text.strip())
            if n >= _PREFLIGHT_RECORDS and nonempty:
                break
        if n == 0:
            raise DataError(f"{source_label(src)}: empty corpus (no records)")
        if nonempty == 0:
            raise DataError(f"{source_label(src)}: empty corpus (the first {n} records have no text)")


@dataclass
class HeldOut:
    """Held-out sequences (each at most seq_len tokens, from one source) for evaluation."""

    ids: list[list[int]]
    langs: list[list[int]]
    source: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def build_heldout(cfg: DataConfig, tokenizer: Any, langs: Languages, seed: int) -> HeldOut:
    tok = Tokenize(tokenizer, cfg.add_eos)
    out = HeldOut([], [], [])
    for si, src in enumerate(cfg.sources):
        if cfg.heldout_max_tokens == 0 or (cfg.heldout_fraction == 0 and not src.eval_only):
            continue
        doc = _Doc(src, langs)
        ids: list[int] = []
        lang_ids: list[int] = []
        for k, rec in enumerate(_records(src, 0)):
            text, lang = doc(rec, k)
            if not (src.eval_only or is_heldout(seed, text, cfg.heldout_fraction)):
                continue
            t = tok(text)[: cfg.heldout_max_tokens - len(ids)]
            ids += t
            lang_ids += [lang] * len(t)
            if len(ids) >= cfg.heldout_max_tokens:
                break
        for i in range(0, len(ids), cfg.seq_len):
            if len(ids[i : i + cfg.seq_len]) > 1:  # a 1-token sequence predicts nothing
                out.ids.append(ids[i : i + cfg.seq_len])
                out.langs.append(lang_ids[i : i + cfg.seq_len])
                out.source.append(si)
    return out


class TrainStream:
    """The global stream of packed training sequences; deterministic, resumable."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, langs: Languages, seed: int):
        self.cfg = cfg
        self.tok = Tokenize(tokenizer, cfg.add_eos)
        self.seed = seed
        self.train = [i for i, s in enumerate(cfg.sources) if not s.eval_only]
        self.docs = {i: _Doc(cfg.sources[i], langs) for i in self.train}
        self.rng = random.Random(seed)
        self.cursor = {i: {"epoch": 0, "record": 0, "docs": 0, "tokens": 0} for i in self.train}
        # documents (or their tails) not yet cut into sequences: (tokens, language); the tokens are
        # a list here and a lazy span of a packed dataset in PackedStream (read only where needed)
        self.buf: deque[tuple[Any, int]] = deque()
        self.buf_len = 0
        self.done: set[int] = set()
        self.pool: list[tuple[list[int], int]] = []  # shuffle buffer of tokenised documents
        self.pool_rng = random.Random(f"{seed}:shuffle")
        self._iters: dict[int, Iterator[dict[str, Any]]] = {}

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        st, pst = self.rng.getstate(), self.pool_rng.getstate()
        return {
            "cursor": {str(k): dict(v) for k, v in self.cursor.items()},
            "rng": [st[0], list(st[1]), st[2]],
            "pool_rng": [pst[0], list(pst[1]), pst[2]],
            "pool": [[self._dump(ids), lang] for ids, lang in self.pool],
            **self._buf_state(),
            "done": sorted(self.done),
        }

    def _dump(self, ids: Any) -> Any:
        return list(ids)

    def _load(self, ids: Any) -> Any:
        return list(ids)

    def _buf_state(self) -> dict[str, Any]:
        """The buffer as flat token and language lists (the format of earlier checkpoints)."""
        ids = [t for seg, _ in self.buf for t in seg]
        langs = [lang for seg, lang in self.buf for _ in range(len(seg))]
        return {"buf_ids": ids, "buf_langs": langs}

    def _load_buf(self, state: Mapping[str, Any]) -> None:
        ids, langs = list(state["buf_ids"]), list(state["buf_langs"])
        start = 0
        for k in range(1, len(ids) + 1):  # one segment per run of one language
            if k == len(ids) or langs[k] != langs[start]:
                self.buf.append((ids[start:k], langs[start]))
                start = k

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cursor = {int(k): dict(v) for k, v in state["cursor"].items()}
        if sorted(self.cursor) != self.train:
            raise DataError("the checkpoint's data state does not match the configured sources")
        r = state["rng"]
        self.rng.setstate((r[0], tuple(r[1]), r[2]))
        r = state["pool_rng"]
        self.pool_rng.setstate((r[0], tuple(r[1]), r[2]))
        self.pool = [(self._load(ids), int(lang)) for ids, lang in state["pool"]]
        self.buf = deque()
        self._load_buf(state)
        self.buf_len = sum(len(seg) for seg, _ in self.buf)
        self.done = set(state["done"])
        self._iters = {}

    # -- reading -------------------------------------------------------------------------
    def _budget(self, i: int) -> int | None:
        return self.cfg.sources[i].tokens

    def _pick(self) -> int | None:
        live = [i for i in self.train if i not in self.done]
        if not live:
            return None
        if self.cfg.by_budget:  # the source furthest behind its share goes next
            return min(live, key=lambda i: (self.cursor[i]["tokens"] / self._budget(i), i))  # type: ignore[operator]
        weights = [self.cfg.sources[i].weight or 1.0 for i in live]
        return self.rng.choices(live, weights)[0]

    def _next_doc(self, i: int) -> tuple[list[int], int]:
        """The next training document of source i (held-out ones skipped; epochs repeat)."""
        src = self.cfg.sources[i]
        cur = self.cursor[i]
        while True:
            it = self._iters.get(i)
            if it is None:
                it = self._iters[i] = _records(src, cur["record"])
            rec = next(it, None)
            if rec is None:  # end of an epoch
                if cur["docs"] == 0:
                    raise DataError(
                        f"{source_label(src)}: no training documents (the corpus is empty, or every document "
                        "is held out; lower data.heldout_fraction)"
                    )
                cur["epoch"] += 1
                cur["record"] = cur["docs"] = 0
                del self._iters[i]
                continue
            k = cur["record"]
            cur["record"] += 1
            text, lang = self.docs[i](rec, k)
            if is_heldout(self.seed, text, self.cfg.heldout_fraction):
                continue
            ids = self.tok(text)
            if not ids:
                continue
            cur["docs"] += 1
            return ids, lang

    def _next_mixed(self) -> tuple[list[int], int] | None:
        """The next document of the mix (None when every token budget is used up)."""
        i = self._pick()
        if i is None:
            return None
        ids, lang = self._next_doc(i)
        budget = self._budget(i)
        if budget is not None:
            ids = ids[: budget - self.cursor[i]["tokens"]]
        self.cursor[i]["tokens"] += len(ids)
        if budget is not None and self.cursor[i]["tokens"] >= budget:
            self.done.add(i)
        return ids, lang

    def _next_shuffled(self) -> tuple[list[int], int] | None:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            return self._next_mixed()
        while len(self.pool) < size:
            item = self._next_mixed()
            if item is None:
                break
            self.pool.append(item)
        if not self.pool:
            return None
        j = self.pool_rng.randrange(len(self.pool))
        self.pool[j], self.pool[-1] = self.pool[-1], self.pool[j]
        return self.pool.pop()

    def _fill(self, need: int) -> bool:
        """Read documents until the buffer holds ``need`` tokens; False if the stream ended."""
        while self.buf_len < need:
            item = self._next_shuffled()
            if item is None:
                return False
            ids, lang = item
            if len(ids):
                self.buf.append((ids, lang))
                self.buf_len += len(ids)
        return True

    def _tokens(self, seg: Any) -> torch.Tensor:
        return torch.tensor(seg, dtype=torch.long)

    def take(self, n: int, keep: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``n`` sequences of the global stream: input ids and token languages, [n, L] each,
        or only the rows ``keep`` (in that order; the others are skipped, and a packed dataset
        reads only the kept rows' tokens).

        Raises StopIteration when token budgets are used up.
        """
        seq = self.cfg.seq_len
        if not self._fill(n * seq):
            raise StopIteration
        rows = list(range(n)) if keep is None else list(keep)
        where = {r: i for i, r in enumerate(rows)}
        ids = torch.empty(len(rows), seq, dtype=torch.long)
        lang = torch.empty(len(rows), seq, dtype=torch.long)
        pos, need = 0, n * seq
        while pos < need:
            seg, tag = self.buf.popleft()
            k = min(len(seg), need - pos)
            for r in range(pos // seq, (pos + k - 1) // seq + 1):  # the rows this piece covers
                if r in where:
                    lo, hi = max(pos, r * seq), min(pos + k, (r + 1) * seq)
                    ids[where[r], lo - r * seq : hi - r * seq] = self._tokens(seg[lo - pos : hi - pos])
                    lang[where[r], lo - r * seq : hi - r * seq] = tag
            if k < len(seg):
                self.buf.appendleft((seg[k:], tag))
            pos += k
        self.buf_len -= need
        return ids, lang


def budget_sequences(cfg: DataConfig) -> int | None:
    """How many full sequences the token budgets fill (None when mixing by weight)."""
    if not cfg.by_budget:
        return None
    return sum(s.tokens or 0 for s in cfg.sources if not s.eval_only) // cfg.seq_len
