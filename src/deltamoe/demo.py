"""``deltamoe demo``: the main job on built-in data, no downloads.

Until the full toy pipeline lands, the demo runs the stages that exist: it writes a small
synthetic Llama checkpoint, upcycles it for each supported expert count, loads every result with
stock transformers and checks that it computes what the dense model computes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deltamoe.synthetic import llama_config, write_dense
from deltamoe.upcycle import upcycle


def run_demo(workdir: str | os.PathLike[str] = "deltamoe-demo", *, force: bool = True) -> list[dict[str, object]]:
    """Upcycle a synthetic dense model with E in {2, 4, 8}, K in {1, 2}; return one result row per run."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Path(workdir)
    dense = work / "dense"
    if not (dense / "config.json").is_file():
        cfg = llama_config(hidden=64, intermediate=172, layers=4, vocab=256, heads=4, kv_heads=2)
        write_dense(dense, cfg, std=0.2)
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = ref(x).logits
        ref_gen = ref.generate(x[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
    rows = []
    for e in (2, 4, 8):
        for k in (1, 2):
            out = upcycle(dense, work / f"moe-e{e}-k{k}", num_experts=e, top_k=k, seed=0, force=force, progress=False,
                          allocation={"orig": [0], "new": list(range(1, e))})
            moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            with torch.no_grad():
                diff = (moe(x).logits - ref_logits).abs().max().item()
                same = torch.equal(moe.generate(x[:, :8], max_new_tokens=16, do_sample=False, pad_token_id=0), ref_gen)
            rows.append({"experts": e, "top_k": k, "architecture": type(moe).__name__, "max_abs_dlogits": diff,
                         "greedy_identical": same, "path": str(out)})
    return rows
