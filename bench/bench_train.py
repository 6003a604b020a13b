"""Stage-1 training throughput on CPU: deltamoe's training path vs stock transformers.

    python -m bench.bench_train [--quick] [--repeats 3]

For a tiny and a small upcycled Mixtral (4 experts, top-2), each variant runs in a fresh
process (so peak RSS is its own) and trains the same random token batches with the same frozen
set (stage 1: new experts and routers train; expert 0, attention, embeddings, norms, LM head are
frozen), AdamW, next-token + 0.01 x load-balancing loss:

- deltamoe: the training path of ``deltamoe train`` (one parameter per expert, router hooks,
  deltamoe's losses), without the data pipeline;
- stock grouped_mm / stock eager: ``AutoModelForCausalLM`` with transformers' default experts
  implementation (grouped_mm) or the eager loop, fused expert parameters trainable as a whole,
  expert 0's slices masked by gradient hooks, no weight decay (so expert 0 stays frozen),
  ``output_router_logits=True`` and transformers' own aux loss;
- deltamoe train (end to end): the ``deltamoe train`` command on a generated corpus (tokenising,
  packing, logging included); tokens/s from its log, after the first logging interval.

tokens/s counts every token of every batch; warmup steps are not timed. Both wall-clock and
CPU-time (``time.process_time``) rates are reported: on a shared machine the wall clock measures
the neighbours as much as the code, while with one compute thread (``--threads 1``, the default)
CPU time is the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import alternate, machine, measure

MODELS = {
    # name: (config kwargs, micro batch, seq len, timed steps)
    "tiny": (dict(hidden=64, intermediate=172, layers=2, vocab=1000, heads=4, kv_heads=2), 8, 128, 40),
    "small": (dict(hidden=512, intermediate=1376, layers=4, vocab=8000, heads=8, kv_heads=4), 4, 256, 8),
}
EXPERTS, TOP_K = 4, 2


def build(work: Path, name: str) -> Path:
    import torch

    from deltamoe.synthetic import llama_config, write_dense
    from deltamoe.upcycle import upcycle

    kw = MODELS[name][0]
    dense = write_dense(work / f"{name}-dense", llama_config(**kw), dtype=torch.float32)
    return upcycle(
        dense,
        work / f"{name}-moe",
        num_experts=EXPERTS,
        top_k=TOP_K,
        noise=0.1,
        seed=0,
        allocation={"en": [0], "xx": list(range(1, EXPERTS))},
        progress=False,
    )


# -- one variant, in its own process ------------------------------------------------------
def worker(variant: str, model_dir: Path, mb: int, seq: int, steps: int, warmup: int) -> dict:
    import resource

    import torch

    from deltamoe.checkpoint import open_checkpoint
    from deltamoe.provenance import read_manifest
    from deltamoe.train import losses as L

    ckpt = open_checkpoint(model_dir)
    moe = read_manifest(model_dir)["moe"]
    vocab = ckpt.config["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (mb, seq), generator=gen) for _ in range(warmup + steps)]
    if variant == "deltamoe":
        from deltamoe.train.config import PostPretrainTrainable
        from deltamoe.train.model import RouterCapture, load_for_training
        from deltamoe.train.policy import apply_policy

        model, layout = load_for_training(ckpt, moe)
        apply_policy(model, layout, PostPretrainTrainable())
        cap = RouterCapture(layout.routed_layers)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def expert0():
            return [lay.experts.gate_up(0).detach().clone() for lay in layout.layers]

        def step(ids):
            with cap.capture():
                logits = model(input_ids=ids, use_cache=False).logits
            loss = L.token_losses(logits, ids).mean() + 0.01 * L.balance_loss(cap.ordered(), TOP_K)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from transformers import AutoModelForCausalLM

        impl = variant.split("-", 1)[1]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, experts_implementation=impl)
        model.config.router_aux_loss_coef = 0.01
        experts = []
        for name, p in model.named_parameters():
            p.requires_grad_(".mlp.experts." in name or ".mlp.gate." in name)
        for layer in model.model.layers:
            ex = layer.mlp.experts
            experts.append(ex)
            for p in (ex.gate_up_proj, ex.down_proj):
                p.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), 0.0))  # expert 0 stays frozen
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

        def expert0():
            return [ex.gate_up_proj[0].detach().clone() for ex in experts]

        def step(ids):
            out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model.train()
    before = expert0()
    for ids in batches[:warmup]:
        step(ids)
    t, c = time.perf_counter(), time.process_time()
    for ids in batches[warmup:]:
        step(ids)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    frozen_ok = all(torch.equal(a, b) for a, b in zip(before, expert0(), strict=True))
    return {
        "tokens_per_s_cpu": steps * mb * seq / cpu,
        "tokens_per_s_wall": steps * mb * seq / wall,
        "expert0_unchanged": frozen_ok,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def end_to_end(work: Path, name: str, moe: Path, mb: int, seq: int, steps: int, threads: int) -> dict:
    """``deltamoe train`` on a generated corpus; tokens/s from its log (first interval skipped)."""
    import yaml

    vocab = MODELS[name][0]["vocab"]
    rng = random.Random(0)
    corpus = work / f"{name}-corpus.txt"
    corpus.write_text(
        "\n".join(
            " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(rng.randint(50, 400)))
            for _ in range(max(200, steps * mb * seq // 150))
        )
        + "\n"
    )
    out = work / f"{name}-trained"
    cfg = {
        "stage": "post_pretrain",
        "model": str(moe),
        "output": str(out),
        "run_dir": str(work / f"{name}-run"),
        "data": {"sources": [{"path": str(corpus), "lang": "xx"}], "seq_len": seq, "heldout_fraction": 0.0},
        "train": {"steps": steps, "micro_batch_size": mb, "lr": 1e-4, "max_grad_norm": None},
        "logging": {"every": 2, "tensorboard": False, "progress": False},
    }
    path = work / f"{name}-train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).parent / "deltamoe"
    r = measure([str(exe), "train", str(path), "--force", "-q"], env={"OMP_NUM_THREADS": str(threads)})
    log = [json.loads(x) for x in (work / f"{name}-run" / "logs" / "train.jsonl").read_text().splitlines()]
    rates = [x["tokens_per_s"] for x in log if x["kind"] == "train"][1:]
    shutil.rmtree(work / f"{name}-run")
    return {"tokens_per_s_wall": statistics.median(rates), "peak_rss": r["peak_rss"], "wall": r["wall"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model only, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: per model)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch compute threads (OMP_NUM_THREADS)")
    ap.add_argument("--json", default="bench/out/train.json")
    ap.add_argument("--worker", nargs=5, metavar=("VARIANT", "MODEL", "MB", "SEQ", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        v, m, mb, seq, steps = args.worker
        print(json.dumps(worker(v, Path(m), int(mb), int(seq), int(steps), args.warmup)))
        return

    work = Path(tempfile.mkdtemp(prefix="deltamoe-bench-train-"))
    names = ["tiny"] if args.quick else list(MODELS)
    repeats = 1 if args.quick else args.repeats
    results: dict[str, dict] = {
        "machine": machine(),
        "threads": args.threads,
        "warmup": args.warmup,
        "repeats": repeats,
        "experts": EXPERTS,
        "top_k": TOP_K,
        "models": {},
    }
    for name in names:
        moe = build(work, name)
        _, mb, seq, default_steps = MODELS[name]
        steps = args.steps or default_steps
        print(f"== {name}: micro batch {mb} x seq {seq}, {EXPERTS} experts top-{TOP_K}", flush=True)
        runs: dict[str, list[dict]] = {}

        def run(variant: str, moe=moe, mb=mb, seq=seq, steps=steps, runs=runs) -> dict:
            import subprocess

            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_train",
                    "--warmup",
                    str(args.warmup),
                    "--threads",
                    str(args.threads),
                    "--worker",
                    variant,
                    str(moe),
                    str(mb),
                    str(seq),
                    str(steps),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )
            if res.returncode != 0:
                raise RuntimeError(f"{variant} failed: {res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            runs.setdefault(variant, []).append(r)
            r["wall"] = steps * mb * seq / r["tokens_per_s_cpu"]  # what alternate() prints: CPU seconds
            return r

        variants = {v: (lambda v=v: run(v)) for v in ("deltamoe", "stock-grouped_mm", "stock-eager")}
        med = alternate(variants, repeats)
        rows = {
            v: {
                "tokens_per_s_cpu": statistics.median(r["tokens_per_s_cpu"] for r in runs[v]),
                "tokens_per_s_wall": statistics.median(r["tokens_per_s_wall"] for r in runs[v]),
                "cpu_runs": [round(r["tokens_per_s_cpu"]) for r in runs[v]],
                "peak_rss": med[v]["peak_rss"],
                "expert0_unchanged": all(r["expert0_unchanged"] for r in runs[v]),
            }
            for v in variants
        }
        rows["deltamoe train (end to end)"] = end_to_end(work, name, moe, mb, seq, steps, args.threads)
        base = rows["deltamoe"]
        for v, r in rows.items():
            if "tokens_per_s_cpu" in r:
                r["deltamoe_speedup_cpu"] = base["tokens_per_s_cpu"] / r["tokens_per_s_cpu"]
            r["deltamoe_speedup_wall"] = base["tokens_per_s_wall"] / r["tokens_per_s_wall"]
            cpu = f"{r['tokens_per_s_cpu']:8.0f} tok/s (CPU time)" if "tokens_per_s_cpu" in r else " " * 24
            print(
                f"  {v:28} {cpu} {r['tokens_per_s_wall']:8.0f} tok/s (wall)  peak RSS {r['peak_rss'] / 2**20:.0f} MiB",
                flush=True,
            )
        results["models"][name] = {"micro_batch": mb, "seq_len": seq, "steps": steps, **MODELS[name][0], "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
