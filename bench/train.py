"""Scenario ``train``: one stage-1 training step, deltamoe's MoE training path against stock transformers.

For an upcycled Mixtral (4 experts, top-2) each variant trains the same random token batches
with the same frozen set (stage 1: new experts and routers train; expert 0, attention,
embeddings, norms and LM head are frozen), AdamW, next-token + 0.01 x load-balancing loss, each
in a fresh process (so its peak RSS is its own):

- deltamoe: the training path of ``deltamoe train`` (one parameter per expert, router hooks,
  deltamoe's losses), without the data pipeline;
- stock grouped_mm / stock eager: ``AutoModelForCausalLM`` with transformers' default experts
  implementation (``grouped_mm``) or its eager loop; the fused expert parameters train as a
  whole, expert 0's slices are zeroed by gradient hooks, no weight decay (so expert 0 stays
  frozen: checked after every run, for every variant); ``output_router_logits=True`` and
  transformers' own aux loss;
- deltamoe train (end to end): the ``deltamoe train`` command on a generated corpus
  (tokenising, packing, logging included); tokens/s from its log after the first interval.

Rates count every token of every timed batch (warmup steps are not timed). With one compute
thread (the default) the CPU time of the process (``time.process_time``) is the work done and
is what the ratios use; the wall clock also measures the neighbours on a shared machine.

    python -m bench.train --worker VARIANT MODEL_DIR MB SEQ STEPS   (one variant; used by the harness)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench.common import alternate, deltamoe_exe, measure

MODELS = {
    # name: (config kwargs, micro batch, seq len, timed steps)
    "tiny": (dict(hidden=64, intermediate=172, layers=2, vocab=1000, heads=4, kv_heads=2), 8, 128, 40),
    "small": (dict(hidden=512, intermediate=1376, layers=4, vocab=8000, heads=8, kv_heads=4), 4, 256, 8),
}
EXPERTS, TOP_K = 4, 2
VARIANTS = ("deltamoe", "stock-grouped_mm", "stock-eager")
LABELS = {"deltamoe": "deltamoe step", "stock-grouped_mm": "stock grouped_mm (default)", "stock-eager": "stock eager"}
E2E = "deltamoe train (end to end)"
_ROOT = str(Path(__file__).resolve().parent.parent)


def build(work: Path, name: str) -> Path:
    import torch

    from deltamoe.synthetic import llama_config, write_dense
    from deltamoe.ops.upcycle import upcycle

    out = work / f"{name}-moe"
    if (out / "deltamoe.json").exists():
        return out
    dense = write_dense(work / f"{name}-dense", llama_config(**MODELS[name][0]), dtype=torch.float32)
    return upcycle(dense, out, num_experts=EXPERTS, top_k=TOP_K, noise=0.1, seed=0,
                   allocation={"en": [0], "xx": list(range(1, EXPERTS))}, progress=False, force=True)


# -- one variant, in its own process ------------------------------------------------------
def load_stock(model_dir: Path, dtype=None, **kw):
    """The upcycled MoE as stock transformers loads it (fused experts), on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32, **kw)


def make_step(variant: str, model, model_dir: Path, *, lr: float = 1e-4, autocast: str | None = None):
    """(step(ids) -> loss, expert0() -> expert-0 tensors) for ``variant`` on a loaded stock ``model``.

    ``variant``: "deltamoe" or "deltamoe-IMPL" (split experts with experts_implementation IMPL, default auto; deltamoe's policy and losses) or "stock-IMPL" (the
    fused experts with transformers' ``IMPL`` experts implementation, expert 0 masked). The
    model may already be on its device. ``autocast``: a device type to run the forward pass and
    the loss under bf16 autocast (as ``deltamoe train`` does with precision bf16), or None.
    Shared with bench/gpu_check.py.
    """
    import contextlib

    import torch

    from deltamoe.io import open_checkpoint
    from deltamoe.io.provenance import read_manifest
    from deltamoe.train import losses as L

    ctx = (lambda: torch.autocast(autocast, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    moe = read_manifest(model_dir)["moe"]
    top_k = int(moe["top_k"])
    device = next(model.parameters()).device
    if variant.startswith("deltamoe"):
        from deltamoe.train.config import PostPretrainTrainable
        from deltamoe.train.model import RouterCapture, split_and_map
        from deltamoe.train.policy import apply_policy

        model.config.use_cache = False
        fsdp2 = variant.endswith("-fsdp2")  # FSDP2 as `distributed.engine: fsdp2` applies it (world size 1)
        impl = variant.removesuffix("-fsdp2").split("-", 1)[1] if variant.count("-") > fsdp2 else "auto"
        layout = split_and_map(model, moe, open_checkpoint(model_dir), experts_implementation=impl)  # as load_for_training
        apply_policy(model, layout, PostPretrainTrainable())
        if fsdp2:
            from deltamoe.train import distributed as dist_engine

            dist_engine.shard(model, device, 1)
        cap = RouterCapture(layout.routed_layers)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

        def expert0():
            from deltamoe.train.distributed import _local

            return [_local(lay.experts.gate_up(0)).detach().clone() for lay in layout.layers]

        def step(ids):
            with ctx(), cap.capture():
                logits = model(input_ids=ids, use_cache=False).logits
                loss = L.token_losses(logits, ids).mean() + 0.01 * L.balance_loss(cap.ordered(), top_k)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    else:
        impl = variant.split("-", 1)[1]
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation(impl)
        else:
            model.config._experts_implementation = impl
        model.config.router_aux_loss_coef = 0.01
        experts = []
        for name, p in model.named_parameters():
            p.requires_grad_(".mlp.experts." in name or ".mlp.gate." in name)
        zero = torch.tensor([0], device=device)
        for layer in model.model.layers:
            ex = layer.mlp.experts
            experts.append(ex)
            for p in (ex.gate_up_proj, ex.down_proj):
                p.register_hook(lambda g: g.index_fill(0, zero, 0.0))  # expert 0 stays frozen
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

        def expert0():
            return [ex.gate_up_proj[0].detach().clone() for ex in experts]

        def step(ids):
            with ctx():
                out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss

    model.train()
    return step, expert0


def worker(variant: str, model_dir: Path, mb: int, seq: int, steps: int, warmup: int) -> dict:
    import torch

    from deltamoe.io import open_checkpoint

    vocab = open_checkpoint(model_dir).config["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (mb, seq), generator=gen) for _ in range(warmup + steps)]
    step, expert0 = make_step(variant, load_stock(model_dir), model_dir)
    before = expert0()
    for ids in batches[:warmup]:
        step(ids)
    t, c = time.perf_counter(), time.process_time()
    for ids in batches[warmup:]:
        step(ids)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {
        "tokens_per_s_cpu": steps * mb * seq / cpu,
        "tokens_per_s_wall": steps * mb * seq / wall,
        "step_cpu_s": cpu / steps,
        "expert0_unchanged": all(torch.equal(a, b) for a, b in zip(before, expert0(), strict=True)),
    }


def end_to_end(work: Path, name: str, moe: Path, mb: int, seq: int, steps: int, threads: int) -> dict:
    """``deltamoe train`` on a generated corpus; tokens/s from its log (first interval skipped)."""
    import yaml

    vocab = MODELS[name][0]["vocab"]
    rng = random.Random(0)
    corpus = work / f"{name}-corpus.txt"
    corpus.write_text("\n".join(" ".join(f"t{rng.randrange(3, vocab)}" for _ in range(rng.randint(50, 400)))
                                for _ in range(max(200, steps * mb * seq // 150))) + "\n")
    out, run_dir = work / f"{name}-trained", work / f"{name}-run"
    cfg = {
        "stage": "post_pretrain", "model": str(moe), "output": str(out), "run_dir": str(run_dir),
        "data": {"sources": [{"path": str(corpus), "lang": "xx"}], "seq_len": seq, "heldout_fraction": 0.0},
        "train": {"steps": steps, "micro_batch_size": mb, "lr": 1e-4, "max_grad_norm": None},
        "logging": {"every": 2, "tensorboard": False, "progress": False},
    }
    path = work / f"{name}-train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(run_dir, ignore_errors=True)
    r = measure([deltamoe_exe(), "train", path, "--force", "-q"], env={"OMP_NUM_THREADS": str(threads)})
    log = [json.loads(x) for x in (run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in log if x["kind"] == "train"][1:]
    shutil.rmtree(run_dir)
    shutil.rmtree(out, ignore_errors=True)
    return {"tokens_per_s_wall": statistics.median(rates), "peak_rss": r["peak_rss"], "wall": r["wall"]}


def run(work: Path, *, names: list[str], repeats: int, steps: int | None, warmup: int, threads: int,
        end_to_end_run: bool = True) -> dict:
    models = {}
    for name in names:
        moe = build(work, name)
        _, mb, seq, default_steps = MODELS[name]
        n_steps = steps or default_steps
        print(f"  == {name}: micro batch {mb} x seq {seq}, {EXPERTS} experts top-{TOP_K}, {n_steps} timed steps",
              flush=True)
        env = {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}

        def one(variant: str, moe=moe, mb=mb, seq=seq, n_steps=n_steps, env=env) -> dict:
            r = measure([sys.executable, "-m", "bench.train", "--warmup", warmup, "--threads", threads, "--worker",
                         variant, moe, mb, seq, n_steps], env=env, capture=True)
            r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
            r["cpu_s"] = r["step_cpu_s"]  # what alternate() prints and takes the median of
            return r

        med = alternate({LABELS[v]: (lambda v=v: one(v)) for v in VARIANTS}, repeats, key="cpu_s")
        rows = {}
        for v in VARIANTS:
            runs = med[LABELS[v]]["runs"]
            if not all(r["expert0_unchanged"] for r in runs):
                raise RuntimeError(f"{v}: expert 0 changed during training; the comparison is invalid")
            rows[LABELS[v]] = {
                "step_cpu_s": statistics.median(r["step_cpu_s"] for r in runs),
                "tokens_per_s_cpu": statistics.median(r["tokens_per_s_cpu"] for r in runs),
                "tokens_per_s_wall": statistics.median(r["tokens_per_s_wall"] for r in runs),
                "cpu_runs": [round(r["tokens_per_s_cpu"]) for r in runs],
                "peak_rss": med[LABELS[v]]["peak_rss"],
                "expert0_unchanged": True,
            }
        if end_to_end_run:
            rows[E2E] = end_to_end(work, name, moe, mb, seq, n_steps, threads)
        models[name] = {"micro_batch": mb, "seq_len": seq, "steps": n_steps, "shape": MODELS[name][0], "rows": rows}
    ratios = []
    for name, m in models.items():
        d = m["rows"][LABELS["deltamoe"]]["tokens_per_s_cpu"]
        best = max(m["rows"][LABELS[v]]["tokens_per_s_cpu"] for v in VARIANTS[1:])
        ratios.append({"what": f"{name}: deltamoe / best stock experts implementation (tokens/s, CPU time)",
                       "value": d / best, "goal": ">= 1", "met": d >= best})
        for v in VARIANTS[1:]:
            ratios.append({"what": f"{name}: deltamoe / {LABELS[v]} (tokens/s, CPU time)",
                           "value": d / m["rows"][LABELS[v]]["tokens_per_s_cpu"]})
        ratios.append({"what": f"{name}: {LABELS['stock-grouped_mm']} / deltamoe (peak RSS)",
                       "value": m["rows"][LABELS["stock-grouped_mm"]]["peak_rss"] / m["rows"][LABELS["deltamoe"]]["peak_rss"]})
    desc = "; ".join(
        f"{n}: hidden {m['shape']['hidden']}, intermediate {m['shape']['intermediate']}, {m['shape']['layers']} layers, "
        f"vocab {m['shape']['vocab']}, micro-batch {m['micro_batch']} x {m['seq_len']} tokens, {m['steps']} timed steps"
        for n, m in models.items())
    return {
        "title": f"stage-1 training step ({EXPERTS} experts, top-{TOP_K}, float32, {threads} thread(s))",
        "setup": desc,
        "models": models,
        "ratios": ratios,
        "threads": threads,
        "warmup": warmup,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=5, metavar=("VARIANT", "MODEL", "MB", "SEQ", "STEPS"), required=True)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    v, m, mb, seq, steps = args.worker
    print(json.dumps(worker(v, Path(m), int(mb), int(seq), int(steps), args.warmup)))


if __name__ == "__main__":
    main()
