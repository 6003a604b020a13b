"""Shared pieces of the benchmarks: measuring a command, alternating repeats, the I/O floor,
the synthetic models every scenario uses, and the machine description.

Peak RSS: every measured command runs as the only child of a tiny wrapper interpreter (about
10 MB, no imports beyond the standard library) that reports ``RUSAGE_CHILDREN.ru_maxrss``.
Linux carries a process's high-water mark across ``fork``/``exec``, so a child started by a
big process (the harness has torch imported) would report at least the parent's size; started
by the wrapper it reports its own peak (or the wrapper's ~10 MB, whichever is larger).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# Runs argv as its only child; prints {"rc", "wall", "cpu", "peak_rss", "stdout"} of that child alone
# (cpu: user + system seconds of the child and its own children).
_RSS_WRAPPER = """
import json, resource, subprocess, sys, time
capture = sys.argv[1] == "1"
t = time.perf_counter()
p = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE if capture else subprocess.DEVNULL, text=True)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": p.returncode, "wall": wall, "stdout": p.stdout if capture else "",
                  "cpu": ru.ru_utime + ru.ru_stime, "peak_rss": ru.ru_maxrss * 1024}))
"""


def measure(argv: Sequence[str], env: dict[str, str] | None = None, capture: bool = False) -> dict:
    """Wall time (startup included), CPU time and peak RSS of one run of ``argv``; its stdout if ``capture``."""
    res = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, "1" if capture else "0", *map(str, argv)],
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"measuring {argv[0]} failed: {res.stderr[-2000:]}") from None
    if out["rc"] != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:3]))} ... failed (exit {out['rc']}): {res.stderr[-3000:]}")
    if not capture:
        out.pop("stdout", None)
    return out


def alternate(commands: dict[str, Callable[[], dict]], repeats: int, key: str = "wall") -> dict[str, dict]:
    """Run each command ``repeats`` times, interleaved (A B C A B C ...); medians of ``key``.

    Alternating spreads the drift of a shared machine over all commands alike, so the ratio of
    two medians measured this way is far steadier than either absolute number.
    """
    runs: dict[str, list[dict]] = {k: [] for k in commands}
    for i in range(repeats):
        for name, fn in commands.items():
            r = fn()
            runs[name].append(r)
            print(f"  [{i + 1}/{repeats}] {name}: {r[key]:.2f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB", flush=True)
    return {
        k: {key: statistics.median(r[key] for r in v), "peak_rss": max(r["peak_rss"] for r in v),
            f"{key}s": [round(r[key], 3) for r in v], "runs": v,
            **({"cpu": statistics.median(r["cpu"] for r in v)} if all("cpu" in r for r in v) else {})}
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


def weights(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*.safetensors"))


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in weights(path))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def deltamoe_exe() -> str:
    return str(Path(sys.executable).parent / "deltamoe")


def mergekit_exe(venv: str | os.PathLike[str], tool: str) -> Path | None:
    """``tool`` from the mergekit venv, else from the current one; None when neither has it."""
    for p in (Path(venv) / "bin" / tool, Path(sys.executable).parent / tool):
        if p.exists():
            return p
    return None


def mergekit_version(exe: Path | None) -> str | None:
    if exe is None:
        return None
    py = exe.parent / "python"
    res = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                         capture_output=True, text=True)
    return res.stdout.strip() or None


def machine() -> dict[str, str]:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "bench"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deltamoe": f"{commit}{'+dirty' if dirty else ''}",
    }
    try:
        info["load_average_at_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


# -- the synthetic models -------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A Llama-shaped synthetic model (bf16 on disk)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int

    def config(self, dtype: str = "bfloat16") -> dict:
        from deltamoe.synthetic import llama_config

        return llama_config(hidden=self.hidden, intermediate=self.intermediate, layers=self.layers, vocab=self.vocab,
                            heads=self.heads, kv_heads=self.kv_heads, dtype=dtype)

    def describe(self) -> str:
        return (f"hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, vocab {self.vocab}, "
                f"GQA {self.heads}/{self.kv_heads}")


SHAPES = {
    "quick": Shape(1024, 2816, 8, 16000, 16, 4),  # ~0.25 GB in bf16
    "1b": Shape(2048, 5632, 12, 32000, 16, 4),  # ~1.35 GB in bf16 (a TinyLlama-like shape)
    # two layers of Llama-3-8B's shape with its full vocabulary: the 1 GB embedding is the largest tensor
    "8b-layers": Shape(4096, 14336, 2, 128256, 32, 8),
}


class Models:
    """B (base), P (post-trained), C (continued-pretrained) and M_E (B upcycled to E experts),
    written once into ``root`` and reused (also across runs with the same ``--workdir``)."""

    def __init__(self, root: Path, shape: Shape):
        self.root, self.shape = Path(root), shape

    def dense(self, name: str) -> Path:
        import torch

        from deltamoe.synthetic import write_dense

        seed = {"B": 0, "P": 1, "C": 2}[name]
        path = self.root / name
        if not (path / "config.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            print(f"writing synthetic {name} ({self.shape.describe()}) to {path}", flush=True)
            write_dense(path, self.shape.config(), seed=seed, dtype=torch.bfloat16)
        return path

    def moe(self, experts: int) -> Path:
        path = self.root / f"M{experts}"
        if not (path / "deltamoe.json").exists():
            print(f"upcycling B to {experts} experts at {path}", flush=True)
            measure([deltamoe_exe(), "upcycle", self.dense("B"), path, "-e", str(experts), "-k", "2", "--force", "-q"])
        return path


def rss_goal_bytes(largest_tensor_bytes: int) -> int:
    """The issue's memory goal for graft/merge: 2 x the largest tensor + 300 MB."""
    return 2 * largest_tensor_bytes + 300 * 10**6


def mib(n: float) -> int:
    return round(n / 2**20)
