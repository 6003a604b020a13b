"""Scenario ``pack``: tokenising once (``deltamoe data pack``) against tokenising while training.

On the micro toy world (its byte-level BPE tokenizer and base model; its continued-pretraining
corpora repeated to ``--docs`` documents per language, each copy made distinct):

- packing: tokens/s of ``deltamoe.train.pack.pack`` with 1 and with N worker processes (wall
  clock, pack written to local disk, sha256 of the sources included);
- data wait per optimizer step: the time ``stream.take`` needs for one global batch of
  ``--global-batch`` sequences of ``--seq`` tokens, as process 0 of ``--processes`` (its own rows
  only), reading raw sources (tokenising on the fly: every process tokenises the whole global
  batch) and reading the pack (memory-mapped; only its own rows' tokens are read). Median over
  ``--steps`` steps after 3 warm-up steps.

    python -m bench.pack [--docs 4000] [--workers 2] [--steps 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _corpus(toy: Path, out: Path, docs: int) -> list[dict]:
    sources = []
    for f in sorted((toy / "cpt").glob("*.jsonl")):
        recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        path = out / f.name
        with open(path, "w") as w:
            for i in range(docs):
                r = recs[i % len(recs)]
                w.write(json.dumps({"text": f"{i} {r['text']}", "lang": r["lang"]}) + "\n")
        sources.append({"path": str(path), "lang": recs[0]["lang"]})
    return sources


def _config(toy: Path, sources: list[dict], seq: int, mb: int, pack: str | None = None) -> dict:
    data = {"sources": sources, "seq_len": seq, "heldout_fraction": 0.01, "heldout_max_tokens": 2000}
    if pack:
        data["pack"] = pack
    return {"stage": "dense_cpt", "model": str(toy / "base"), "output": "/nonexistent", "data": data,
            "train": {"steps": 1, "micro_batch_size": mb}}


def _wait(cfg: dict, processes: int, global_batch: int, steps: int) -> float:
    """Median seconds of one step's data for process 0 of ``processes``."""
    from transformers import AutoTokenizer

    from deltamoe.train import data as D
    from deltamoe.train import pack as P
    from deltamoe.train.config import load_config

    c = load_config(cfg)
    tok = AutoTokenizer.from_pretrained(c.model)
    langs = P.languages(c, None)
    if c.data.pack:
        pk = P.Pack(c.data.pack)
        stream: D.TrainStream = P.PackedStream(c.data, pk, tok, langs, 0)
    else:
        stream = D.TrainStream(c.data, tok, langs, 0)
    mb = global_batch // processes
    mine = list(range(mb))  # process 0, one micro-batch per step (grad_accum 1)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        stream.take(global_batch, keep=mine)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=4000, help="documents per language")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--json", type=Path, default=Path("bench/out/pack.json"))
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from deltamoe.toy import build
    from deltamoe.train.pack import pack

    work = Path(tempfile.mkdtemp(prefix="deltamoe-bench-pack-"))
    toy = build(work / "toy", "micro", seed=0, progress=False)
    sources = _corpus(toy, work, a.docs)
    result: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                               f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"), "args": vars(a) | {"json": str(a.json)}}
    for workers in sorted({1, a.workers}):
        t0 = time.perf_counter()
        out = pack(_config(toy, sources, a.seq, 8), work / f"pack-{workers}", workers=workers, progress=False)
        dt = time.perf_counter() - t0
        m = json.loads((out / "manifest.json").read_text())
        tokens = sum(s["train"]["tokens"] + s["heldout"]["tokens"] for s in m["sources"])
        result[f"pack_workers_{workers}"] = {"seconds": round(dt, 2), "tokens": tokens, "tokens_per_s": round(tokens / dt)}
    for kind, p in (("raw", None), ("packed", str(work / "pack-1"))):
        sec = _wait(_config(toy, sources, a.seq, 8, p), a.processes, a.global_batch, a.steps)
        result[f"data_wait_{kind}_ms"] = round(sec * 1000, 2)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
