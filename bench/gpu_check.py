"""The GPU check behind bench/gpu.sh: one command on one H100/H200, results in $OUT.

1. Writes a synthetic Llama-shaped dense model of ~1B parameters in bf16 (B) and a second one
   (P, another seed) to stand in for the post-trained model.
2. Upcycles B to 8 experts, top-2 (``deltamoe.ops.upcycle``).
3. Stage-1 training steps (new experts and routers train; expert 0, attention, embeddings,
   norms, LM head frozen; AdamW; next-token + 0.01 x load-balancing loss) on random tokens:
   deltamoe's training path (split experts) and stock transformers' MoE with its default
   experts implementation and with the eager loop, same frozen set. Reports tokens/s, achieved
   TFLOP/s and MFU against the card's dense bf16 peak, and peak GPU memory.
4. Grafts P - B onto the MoE (``deltamoe.ops.graft``), runs one forward pass of the grafted
   model on the GPU and checks that the logits are finite.

Precision: parameters, gradients and AdamW states in bf16 for every variant. The 8-expert MoE
has ~5.9B parameters, ~4.9B of them trainable: ``deltamoe train --precision bf16`` keeps float32
master weights and optimizer states (~80 GB for this model before activations), which an H100
cannot hold; the check times the same arithmetic in pure bf16.

Needs torch, transformers, safetensors, tokenizers and pydantic (bench/gpu.sh installs carried
wheels when pydantic is missing); accelerate and datasets are not used. ``--smoke`` (or
GPU_CHECK_SMOKE=1) runs tiny sizes on the CPU to prove the script end to end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Dense bf16 peak (TFLOP/s, no sparsity) by card; matched on torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0)]

FULL = dict(hidden=2048, intermediate=5632, layers=20, vocab=32000, heads=16, kv_heads=4)  # 1.03B dense
SMOKE = dict(hidden=64, intermediate=160, layers=2, vocab=512, heads=4, kv_heads=2)
EXPERTS, TOP_K = 8, 2
# deltamoe-fsdp2: the same step with the model under FSDP2 (fully_shard per decoder layer + root,
# world size 1, DTensor parameters): the grouped-GEMM experts path as `distributed.engine: fsdp2` runs it
VARIANTS = ("deltamoe", "deltamoe-fsdp2", "deltamoe-eager", "stock-grouped_mm", "stock-eager")


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value
    return None


def dense_params(s: dict) -> int:
    h, i, v, L = s["hidden"], s["intermediate"], s["vocab"], s["layers"]
    kv = s["kv_heads"] * (h // s["heads"])
    return 2 * v * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def flops_per_token(s: dict, seq: int) -> float:
    """Training FLOPs per token, PaLM convention: 6 x active non-embedding parameters (attention,
    router, top-k experts, LM head) + 12 x layers x hidden x seq for attention scores."""
    h, i, v, L = s["hidden"], s["intermediate"], s["vocab"], s["layers"]
    kv = s["kv_heads"] * (h // s["heads"])
    active = L * (2 * h * h + 2 * h * kv + EXPERTS * h + TOP_K * 3 * h * i) + v * h
    return 6 * active + 12 * L * h * seq


class Log:
    def __init__(self, out: Path):
        self.out, self.t0, self.result = out, time.perf_counter(), {"stages": {}}

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def save(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=2) + "\n")


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def train_variant(variant: str, cpu_model, moe_dir: Path, device: str, mb: int, seq: int, steps: int,
                  warmup: int, shape: dict) -> dict:
    import copy

    import torch

    from bench.train import make_step

    model = copy.deepcopy(cpu_model).to(device)
    step, expert0 = make_step(variant, model, moe_dir, lr=1e-5)
    before = expert0()
    vocab = shape["vocab"]
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (mb, seq), generator=gen).to(device) for _ in range(warmup + steps)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for ids in batches[:warmup]:
        step(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    losses = [step(ids).detach() for ids in batches[warmup:]]
    sync()
    wall = time.perf_counter() - t
    tokens = steps * mb * seq
    row = {
        "steps": steps,
        "tokens_per_step": mb * seq,
        "s_per_step": wall / steps,
        "tokens_per_s": tokens / wall,
        "loss_first_last": [float(losses[0]), float(losses[-1])],
        "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
        "expert0_unchanged": all(torch.equal(a, b) for a, b in zip(before, expert0(), strict=True)),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    if device == "cuda":
        row["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    del model, step, expert0, batches, losses, before
    _free(device)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1",
                    help="tiny sizes on the CPU (default from GPU_CHECK_SMOKE=1)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/out/gpu")
    ap.add_argument("--steps", type=int, default=int(os.environ.get("GPU_CHECK_STEPS", 0)) or None)
    ap.add_argument("--micro-batch", type=int, default=int(os.environ.get("GPU_CHECK_MB", 4)))
    ap.add_argument("--seq", type=int, default=int(os.environ.get("GPU_CHECK_SEQ", 0)) or None)
    ap.add_argument("--workdir", default=os.environ.get("GPU_CHECK_WORKDIR"), help="default: a temp dir, removed")
    args = ap.parse_args()

    import torch
    import transformers

    from deltamoe.synthetic import llama_config, write_dense

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or GPU_CHECK_SMOKE=1 for the CPU smoke run", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: more threads only add spinning on a shared machine
    shape = SMOKE if args.smoke else FULL
    steps = args.steps or (3 if args.smoke else 50)
    seq = args.seq or (64 if args.smoke else 1024)
    mb, warmup = args.micro_batch, (1 if args.smoke else 3)
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()}, smoke run)"
    peak = peak_tflops(card) if device == "cuda" else None
    log.result.update({
        "mode": "smoke (CPU, tiny)" if args.smoke else "full",
        "device": card,
        "peak_bf16_tflops": peak,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "shape": {**shape, "dense_params": dense_params(shape), "experts": EXPERTS, "top_k": TOP_K},
        "train": {"micro_batch": mb, "seq_len": seq, "steps": steps, "warmup": warmup, "dtype": "bfloat16",
                  "optimizer": "AdamW (bf16 states)", "flops_per_token": flops_per_token(shape, seq)},
    })
    log.say(f"device: {card}; dense model {dense_params(shape) / 1e9:.2f}B parameters; torch {torch.__version__}, "
            f"transformers {transformers.__version__}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deltamoe-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    try:
        # 1. synthetic dense B and P
        t = time.perf_counter()
        cfg = llama_config(**shape, dtype="bfloat16")
        for name, seed in (("B", 0), ("P", 1)):
            if not (work / name / "config.json").exists():
                write_dense(work / name, cfg, seed=seed, dtype=torch.bfloat16)
        log.result["stages"]["write_dense_s"] = round(time.perf_counter() - t, 1)
        log.say(f"wrote B and P ({log.result['stages']['write_dense_s']} s)")

        # 2. upcycle
        from deltamoe.ops.upcycle import upcycle

        t = time.perf_counter()
        moe_dir = work / "M"
        upcycle(work / "B", moe_dir, num_experts=EXPERTS, top_k=TOP_K, seed=0,  # defaults: exact copies, random router
                allocation={"en": [0], "xx": list(range(1, EXPERTS))}, progress=False, force=True)
        log.result["stages"]["upcycle_s"] = round(time.perf_counter() - t, 1)
        log.say(f"upcycled to {EXPERTS} experts top-{TOP_K} ({log.result['stages']['upcycle_s']} s)")
        log.save()

        # 3. training steps: load once on the CPU, one copy per variant on the device
        from bench.train import load_stock

        t = time.perf_counter()
        cpu_model = load_stock(moe_dir, dtype=torch.bfloat16)
        log.result["stages"]["load_moe_s"] = round(time.perf_counter() - t, 1)
        log.result["default_experts_implementation"] = getattr(cpu_model.config, "_experts_implementation", None)
        log.say(f"loaded the MoE ({sum(p.numel() for p in cpu_model.parameters()) / 1e9:.2f}B parameters, "
                f"{log.result['stages']['load_moe_s']} s); default experts implementation: "
                f"{log.result['default_experts_implementation']}")
        rows = log.result["train_rows"] = {}
        fpt = flops_per_token(shape, seq)
        for v in VARIANTS:
            t = time.perf_counter()
            try:
                r = train_variant(v, cpu_model, moe_dir, device, mb, seq, steps, warmup, shape)
            except Exception as e:  # an OOM or a missing implementation must not hide the other rows
                ok = False
                rows[v] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                log.say(f"{v}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc()
                _free(device)
                continue
            r["tflops"] = r["tokens_per_s"] * fpt / 1e12
            if peak:
                r["mfu"] = r["tflops"] / peak
            r["wall_s"] = round(time.perf_counter() - t, 1)
            rows[v] = r
            ok &= r["losses_finite"] and r["expert0_unchanged"]
            log.say(f"{v}: {r['tokens_per_s']:.0f} tokens/s, {r['tflops']:.1f} TFLOP/s"
                    + (f", MFU {100 * r['mfu']:.1f} %" if peak else "")
                    + (f", peak memory {r['peak_gpu_mem_gib']} GiB" if "peak_gpu_mem_gib" in r else "")
                    + f", expert 0 unchanged: {r['expert0_unchanged']}")
            log.save()
        del cpu_model
        _free(device)
        base = rows.get("deltamoe", {}).get("tokens_per_s")
        if base:
            log.result["speedup_of_deltamoe"] = {
                v: base / r["tokens_per_s"] for v, r in rows.items() if v != "deltamoe" and "tokens_per_s" in r}

        # 4. graft and one forward pass of the grafted model
        from deltamoe.ops.graft import graft

        t = time.perf_counter()
        grafted = graft(moe_dir, work / "G", base=work / "B", post=work / "P", force=True, progress=False)
        log.result["stages"]["graft_s"] = round(time.perf_counter() - t, 1)
        shutil.rmtree(moe_dir)  # disk: the grafted copy is what is loaded next
        log.say(f"grafted P - B onto the MoE ({log.result['stages']['graft_s']} s)")
        t = time.perf_counter()
        model = load_stock(grafted, dtype=torch.bfloat16).to(device).eval()
        ids = torch.randint(0, shape["vocab"], (2, min(seq, 256)), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(input_ids=ids.to(device)).logits.float()
        finite = bool(torch.isfinite(logits).all())
        ok &= finite
        log.result["graft_forward"] = {"logits_shape": list(logits.shape), "finite": finite,
                                       "logits_abs_max": float(logits.abs().max()),
                                       "seconds": round(time.perf_counter() - t, 1)}
        log.say(f"grafted model forward: logits {list(logits.shape)}, finite: {finite}")
        del model, logits
        _free(device)
    except Exception as e:
        ok = False
        log.result["error"] = f"{type(e).__name__}: {e}"[:3000]
        traceback.print_exc()
    finally:
        log.result["ok"] = ok
        log.save()
        (out / "gpu_check.md").write_text(markdown(log.result))
        print(markdown(log.result))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


def markdown(r: dict) -> str:
    lines = [f"GPU check ({r.get('mode')}{'; its timings mean nothing' if 'smoke' in str(r.get('mode')) else ''}), "
             f"{r.get('date')}: {r.get('device')}; "
             + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()) + ".", ""]
    s, tr = r.get("shape", {}), r.get("train", {})
    if s:
        lines.append(f"Dense {s['dense_params'] / 1e9:.2f}B parameters (hidden {s['hidden']}, intermediate "
                     f"{s['intermediate']}, {s['layers']} layers, vocab {s['vocab']}) upcycled to {s['experts']} "
                     f"experts top-{s['top_k']}; micro-batch {tr.get('micro_batch')} x {tr.get('seq_len')} tokens, "
                     f"{tr.get('steps')} timed steps, bf16 parameters and AdamW states; "
                     f"{tr.get('flops_per_token', 0) / 1e9:.1f} GFLOP per token (6 x active parameters + attention). "
                     f"Peak: {r.get('peak_bf16_tflops')} TFLOP/s.")
        lines.append("")
    rows = r.get("train_rows", {})
    if rows:
        lines += ["| variant | tokens/s | s/step | TFLOP/s | MFU | peak GPU memory | expert 0 unchanged | loss first → last |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, x in rows.items():
            if "error" in x:
                lines.append(f"| {v} | failed: {x['error'][:200]} | | | | | | |")
                continue
            mfu = f"{100 * x['mfu']:.1f} %" if "mfu" in x else "–"
            lines.append(f"| {v} | {x['tokens_per_s']:.0f} | {x['s_per_step']:.3f} | {x['tflops']:.1f} | {mfu} | "
                         f"{x.get('peak_gpu_mem_gib', '–')} GiB | {x['expert0_unchanged']} | "
                         f"{x['loss_first_last'][0]:.4f} → {x['loss_first_last'][1]:.4f} |")
        lines.append("")
    if "speedup_of_deltamoe" in r:
        lines.append("deltamoe speed-up: " + ", ".join(f"{v / 1:.2f}x over {k}" for k, v in
                                                       r["speedup_of_deltamoe"].items()) + ".")
    if "graft_forward" in r:
        g = r["graft_forward"]
        lines.append(f"Grafted model forward: logits {g['logits_shape']}, finite: {g['finite']}.")
    lines.append(f"Stages (s): {r.get('stages')}; total {r.get('elapsed_s')} s; ok: {r.get('ok')}.")
    if "error" in r:
        lines.append(f"Error: {r['error']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
