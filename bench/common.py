"""Shared pieces of the benchmarks: peak-RSS measurement of a command, alternating repeats, the I/O floor."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# Runs argv as a child and prints {"wall": s, "peak_rss": bytes} of that child alone.
_RSS_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
print(json.dumps({"rc": rc, "wall": wall, "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def measure(argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall time and peak RSS of one command run."""
    res = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *argv], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise RuntimeError(f"{argv[0]} failed (exit {out['rc']}): {res.stderr[-2000:]}")
    return out


def alternate(commands: dict[str, Callable[[], dict[str, float]]], repeats: int) -> dict[str, dict[str, float]]:
    """Run each command ``repeats`` times, interleaved (A B C A B C ...), and report medians."""
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in commands}
    for i in range(repeats):
        for name, fn in commands.items():
            r = fn()
            runs[name].append(r)
            print(f"  [{i + 1}/{repeats}] {name}: {r['wall']:.2f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    return {
        k: {"wall": statistics.median(r["wall"] for r in v), "peak_rss": max(r["peak_rss"] for r in v),
            "walls": [round(r["wall"], 3) for r in v]}
        for k, v in runs.items()
    }


# The floor: read every input byte once and write the output's bytes once (fsync'd), nothing else.
_FLOOR = """
import os, sys
inputs, out, n_out = sys.argv[1].split(os.pathsep), sys.argv[2], int(sys.argv[3])
buf = bytearray(64 * 2**20)
for p in inputs:
    with open(p, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
os.makedirs(out, exist_ok=True)
fd = os.open(os.path.join(out, "blob"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
view = memoryview(buf)
while n_out > 0:
    n_out -= os.write(fd, view[: min(len(buf), n_out)])
os.fsync(fd)
os.close(fd)
"""


def io_floor_argv(inputs: Sequence[Path], out: Path, out_bytes: int) -> list[str]:
    return [sys.executable, "-c", _FLOOR, os.pathsep.join(map(str, inputs)), str(out), str(out_bytes)]


def machine() -> dict[str, str]:
    import torch
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
