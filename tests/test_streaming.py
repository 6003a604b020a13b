"""Upcycling streams: peak memory follows the largest tensor, not the model; SIGTERM leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltamoe.io import Checkpoint
from deltamoe.synthetic import llama_config, write_dense

# Runs upcycle in a fresh interpreter and prints its peak RSS (bytes). ru_maxrss would not do:
# Linux carries the parent's resident size at fork() across exec(), so a child of a large pytest
# process would report pytest's size. Resetting the high-water mark first (clear_refs 5) and
# reading VmHWM measures the child alone.
_CHILD = """
import json, sys
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
from deltamoe.ops.upcycle import upcycle
upcycle(sys.argv[1], sys.argv[2], num_experts=int(sys.argv[3]), top_k=2, noise=0.01, seed=0, progress=False)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss": int(hwm.split()[1]) * 1024}))
"""


def _peak_rss(dense: Path, out: Path, experts: int) -> int:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(dense), str(out), str(experts)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_rss"]


@pytest.fixture(scope="module")
def big_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~310 MB in float32; the largest tensor (an FFN matrix) is 11.5 MB.
    cfg = llama_config(hidden=1024, intermediate=2816, layers=6, vocab=2048, heads=16, kv_heads=4)
    return write_dense(tmp_path_factory.mktemp("big") / "dense", cfg, max_shard_bytes=100 * 2**20)


@pytest.mark.slow
def test_peak_rss_is_bounded_by_largest_tensor(big_dense: Path, tmp_path: Path) -> None:
    small_cfg = llama_config(hidden=64, intermediate=128, layers=2, vocab=128, heads=4, kv_heads=2)
    small = write_dense(tmp_path / "small", small_cfg)
    baseline = _peak_rss(small, tmp_path / "small-moe", 4)  # interpreter + torch + transformers + meta model
    ck = Checkpoint(big_dense)
    largest = ck.largest_tensor_bytes
    assert ck.total_bytes > 20 * largest  # the bound below is far from the model size
    peak = _peak_rss(big_dense, tmp_path / "big-moe", 4)
    out_bytes = Checkpoint(tmp_path / "big-moe").total_bytes
    bound = baseline + 3 * largest
    print(f"baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, largest tensor {largest / 2**20:.1f} MiB, "
          f"input {ck.total_bytes / 2**20:.0f} MiB, output {out_bytes / 2**20:.0f} MiB")
    assert peak <= bound, f"peak RSS {peak / 2**20:.0f} MiB exceeds baseline + 3 x largest = {bound / 2**20:.0f} MiB"


@pytest.mark.slow
def test_sigterm_midway_leaves_no_output(big_dense: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "deltamoe"
    out = tmp_path / "moe"
    proc = subprocess.Popen([str(exe), "upcycle", str(big_dense), str(out), "-e", "8", "-k", "2",
                             "--noise", "0.01", "-q"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(p.name.startswith(".moe.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, "upcycle ended before it could be interrupted"
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # SIGTERM: 128 + 15 (issue 14)
    assert "interrupted; no output was written" in err
    assert list(tmp_path.iterdir()) == [], "output or temporary directory left behind"
