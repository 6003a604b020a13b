"""Load dense and upcycled models in transformers 4.x and compare logits (run in the 4.x venv)."""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

root = Path(sys.argv[1])
print(f"transformers {transformers.__version__}")
worst = 0.0
for dense in sorted((root / "dense").iterdir()):
    for kind in ("moe", "moe-part"):
        moe_dir = root / kind / dense.name
        cfg = json.loads((moe_dir / "config.json").read_text())
        # the tiny dense models were saved by transformers 5 (rope in 'rope_parameters' only), so
        # state their rope for 4.x the way the MoE config does
        kw = {k: cfg[k] for k in ("rope_theta", "rope_scaling") if cfg.get(k) is not None}
        ref = AutoModelForCausalLM.from_pretrained(dense, torch_dtype=torch.float32, **kw).eval()
        moe, info = AutoModelForCausalLM.from_pretrained(moe_dir, torch_dtype=torch.float32, output_loading_info=True)
        issues = {k: v for k, v in info.items() if v}
        x = torch.randint(0, ref.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (ref(x).logits - moe.eval()(x).logits).abs().max().item()
        worst = max(worst, diff)
        print(f"{kind:8} {dense.name:18} {type(moe).__name__:22} max|dlogits| {diff:.2e} {issues or ''}")
        assert not issues and diff <= 1e-5, "not exact"
print(f"all exact (worst {worst:.2e})")
