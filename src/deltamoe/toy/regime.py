"""The toy regime: how close a toy build is to the regime of a real model family, measured.

``measure(TOYDIR)`` evaluates every model of a build and checks the regime targets (README,
"The toy world"): enough pre-training per parameter, a flattened original-language loss, a base
that is weak but not blind in the new languages, a small post-training delta, and CPT corpora
large enough for the study. The numbers go to ``toy.json`` under ``regime``; the tests assert the
same targets on the shipped set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deltamoe.errors import UsageError

CHANCE = 0.25  # four options
# name -> (description, threshold, direction, why it matters); a target holds when
# value <direction> threshold.
TARGETS: dict[str, tuple[str, float, str, str]] = {
    "tokens_per_param": ("pre-training tokens per non-embedding parameter", 20.0, ">=",
                         "a real base is saturated on its main language (Llama-3.1-8B: ~1,900 tokens per parameter); "
                         "an under-trained one changes everywhere when trained on anything"),
    "late_gain": ("held-out original-language loss gained in the last 20 % of pre-training (fraction)", 0.02, "<",
                  "the same, measured: the original language's loss has flattened"),
    "base_mc_new_min": ("B's lowest new-language multiple-choice accuracy", CHANCE + 0.10, ">=",
                        "weak but not blind, as a real base is in Greek, Hungarian, Turkish: knowledge can transfer"),
    "base_mc_gap_min": ("B's smallest gap original - new language, multiple choice", 0.25, ">=",
                        "the new languages are clearly the weak ones: there is something to add"),
    "post_ppl_ratio_max": ("P's largest perplexity ratio to B over all languages", 1.10, "<=",
                           "a real post-training delta is small and barely moves perplexity"),
    "post_qa_original": ("P's original-language chat QA", 0.9, ">=", "the behaviour to transfer exists"),
    "post_qa_new_max": ("P's highest new-language chat QA", 0.3, "<=",
                        "P does not already have it in the new languages"),
    "base_qa_max": ("B's highest chat QA in any language", 0.05, "<=",
                    "the chat format comes from the delta only (B never saw the chat tokens)"),
    "cpt_tokens_per_param": ("CPT tokens (all new languages) per dense parameter", 4.0, ">=",
                             "stage 1 can learn the languages in the study (MoE-LPR: ~13 per parameter)"),
    "cpt_sanity_drop": ("fraction of vel perplexity removed by 200 steps of dense CPT on vel (the sanity check)", 0.30,
                        ">=", "continued pre-training has something to teach: the base is not already fluent"),
}
CPT_SANITY = {"lang": "vel", "docs": 8000, "steps": 200, "batch_size": 16, "seq_len": 128, "lr": 1e-3, "warmup": 10}
GROUPS = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "gate_proj", "up_proj",
          "down_proj", "input_layernorm", "post_attention_layernorm", "norm", "lm_head")


def _group(name: str) -> str:
    parts = name.split(".")
    for g in GROUPS:
        if g in parts:
            return g
    return parts[-2] if len(parts) > 1 else name


def delta_norms(base: Path, post: Path) -> dict[str, float]:
    """‖P − B‖ / ‖B‖ (Frobenius, over all tensors of a group) per tensor group, and ``all``."""
    from safetensors import safe_open

    num: dict[str, float] = {}
    den: dict[str, float] = {}
    with safe_open(str(base / "model.safetensors"), "pt") as fb, safe_open(str(post / "model.safetensors"), "pt") as fp:
        for k in fb.keys():  # noqa: SIM118 (safe_open is not a mapping)
            b, p = fb.get_tensor(k).double(), fp.get_tensor(k).double()
            g = _group(k)
            num[g] = num.get(g, 0.0) + float(((p - b) ** 2).sum())
            den[g] = den.get(g, 0.0) + float((b ** 2).sum())
    out = {g: math.sqrt(num[g] / den[g]) if den[g] else math.nan for g in num}
    out["all"] = math.sqrt(sum(num.values()) / sum(den.values()))
    return {g: round(v, 5) for g, v in out.items()}


def _check(name: str, value: float) -> dict[str, Any]:
    desc, threshold, op, _ = TARGETS[name]
    ok = {">=": value >= threshold, "<": value < threshold, "<=": value <= threshold}[op]
    return {"target": name, "what": desc, "value": round(value, 4), "threshold": f"{op} {threshold:g}", "ok": bool(ok)}


def _cpt_tokens(toy: Path, manifest: dict[str, Any]) -> int:
    from transformers import AutoTokenizer

    from deltamoe.toy.tokenizer import encode_plain

    tok = AutoTokenizer.from_pretrained(toy / "tokenizer")
    total = 0
    for lang in manifest["new_languages"]:
        texts = [json.loads(line)["text"] for line in (toy / "cpt" / f"{lang}.jsonl").open(encoding="utf-8")]
        total += sum(len(ids) + 1 for ids in encode_plain(tok, texts))
    return total


def cpt_sanity(toy_dir: str | Path, *, base: str = "base") -> dict[str, float]:
    """The sanity check of continued pre-training: train a copy of ``base`` densely on its first
    ``CPT_SANITY["docs"]`` CPT documents of ``CPT_SANITY["lang"]`` (seed 0, one thread, so the same
    bytes give the same numbers) and measure held-out perplexity before and after, in that language
    and in the original one. Returns ``before``, ``after``, ``drop`` (1 - after / before) and
    ``original_after``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltamoe.evaluate.perplexity import perplexity
    from deltamoe.toy.config import TrainPhase
    from deltamoe.toy.languages import ORIGINAL
    from deltamoe.toy.tokenizer import DOC_SEP, encode_plain
    from deltamoe.toy.train import deterministic, packed_batches, train_loop

    toy, c = Path(toy_dir), CPT_SANITY

    def texts(path: Path, limit: int | None = None) -> list[str]:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f][:limit]

    tok = AutoTokenizer.from_pretrained(toy / base)
    held_out = texts(toy / "eval" / c["lang"] / "ppl.jsonl")
    orig_held_out = texts(toy / "eval" / ORIGINAL / "ppl.jsonl")
    corpus = texts(toy / "cpt" / f"{c['lang']}.jsonl", c["docs"])
    sep = tok.convert_tokens_to_ids(DOC_SEP)
    stream = torch.tensor([i for ids in encode_plain(tok, corpus) for i in (*ids, sep)])
    with deterministic(1):
        model = AutoModelForCausalLM.from_pretrained(toy / base, dtype=torch.float32)
        before = perplexity(model, tok, held_out)["ppl"]
        phase = TrainPhase(steps=c["steps"], batch_size=c["batch_size"], lr=c["lr"], warmup=c["warmup"])
        train_loop(model, packed_batches(stream, c["seq_len"], c["batch_size"], seed=0), phase, desc="cpt sanity",
                   progress=False)
        after = perplexity(model, tok, held_out)["ppl"]
        original_after = perplexity(model, tok, orig_held_out)["ppl"]
    return {"before": before, "after": after, "drop": 1 - after / before, "original_after": original_after}


def measure(toy_dir: str | Path, *, progress: bool = True, write: bool = True) -> dict[str, Any]:
    """Evaluate every model of the build, check the targets, and (with ``write``) record the result
    in ``toy.json`` under ``regime``. Returns the regime record."""
    from deltamoe.evaluate import evaluate
    from deltamoe.toy.builder import TOY_MANIFEST, read_toy_manifest

    toy = Path(toy_dir)
    manifest = read_toy_manifest(toy)
    if manifest is None or "base_of" not in manifest:
        raise UsageError(f"{toy}: not a toy build of this deltamoe (no toy.json with models); build one with "
                         "'deltamoe toy build'")
    orig, new = manifest["original_language"], manifest["new_languages"]
    scores: dict[str, Any] = {}
    for name in manifest["models"]:
        res = evaluate(toy / name, "toy", data=toy, out=toy / "eval-results" / name, progress=progress)
        scores[name] = {lang: {k: v for k, v in row.items() if k in ("qa", "qa_ci", "mc", "mc_ci", "mc_rc", "mc_facts",
                                                                     "qa_rc", "qa_facts", "ppl")}
                        for lang, row in res["languages"].items()}
    checks: list[dict[str, Any]] = []
    bases = sorted({b for b in manifest["base_of"].values()}, key=manifest["models"].index)
    archs: dict[str, Any] = {}
    for base in bases:
        hist = manifest["training"][base]
        curve = hist["curve"]
        steps = curve[-1]["step"]
        at80 = min(curve, key=lambda c: abs(c["step"] - 0.8 * steps))
        late = (at80["heldout_loss"][orig] - curve[-1]["heldout_loss"][orig]) / at80["heldout_loss"][orig]
        b = scores[base]
        entry: dict[str, Any] = {
            "tokens_per_param": hist["tokens"] / hist["non_embedding_params"],
            "late_gain": late,
            "base_mc_new_min": min(b[lang]["mc"] for lang in new),
            "base_mc_gap_min": min(b[orig]["mc"] - b[lang]["mc"] for lang in new),
            "base_qa_max": max(b[lang]["qa"] for lang in (orig, *new)),
        }
        posts = [p for p, bb in manifest["base_of"].items() if bb == base and p != base]
        entry["posts"] = {}
        for post in posts:
            p = scores[post]
            pe = {
                "post_ppl_ratio_max": max(p[lang]["ppl"] / b[lang]["ppl"] for lang in (orig, *new)),
                "post_qa_original": p[orig]["qa"],
                "post_qa_new_max": max(p[lang]["qa"] for lang in new),
                "delta_norm": delta_norms(toy / base, toy / post),
            }
            entry["posts"][post] = pe
            checks += [{**_check(k, pe[k]), "model": post} for k in ("post_ppl_ratio_max", "post_qa_original",
                                                                       "post_qa_new_max")]
        checks += [{**_check(k, entry[k]), "model": base} for k in ("tokens_per_param", "late_gain", "base_mc_new_min",
                                                                      "base_mc_gap_min", "base_qa_max")]
        archs[base] = entry
    cpt = _cpt_tokens(toy, manifest)
    dense = manifest["training"]["base"]["params"]
    checks.append({**_check("cpt_tokens_per_param", cpt / dense), "model": "base"})
    sanity = cpt_sanity(toy)
    checks.append({**_check("cpt_sanity_drop", sanity["drop"]), "model": "base"})
    regime = {"scores": scores, "archs": archs, "cpt_tokens": cpt, "cpt_sanity": sanity, "checks": checks,
              "all_ok": all(c["ok"] for c in checks)}
    if write:
        manifest["regime"] = regime
        (toy / TOY_MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return regime


def regime_differences(a: Any, b: Any, *, rel_tol: float = 1e-7, where: str = "regime") -> list[str]:
    """Where two regime records (or parts of them) differ: every accuracy, count, string and
    verdict exactly; floats to ``rel_tol`` relative, because a perplexity's float reduction order
    depends on the intra-op thread count (measured: up to 3e-8 relative between 1 and 2 threads).
    An accuracy is a multiple of 1 / items, so the tolerance never hides a changed answer."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())} in one record only"]
        return [d for k in a for d in regime_differences(a[k], b[k], rel_tol=rel_tol, where=f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} entries against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in regime_differences(x, y, rel_tol=rel_tol,
                                                                                      where=f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=rel_tol) else [f"{where}: {a!r} against {b!r}"]
    return [] if a == b else [f"{where}: {a!r} against {b!r}"]


def format_regime(regime: dict[str, Any]) -> str:
    """The regime checks as a markdown table."""
    lines = ["| model | target | value | threshold | met | why it matters |", "|---|---|---|---|---|---|"]
    for c in regime["checks"]:
        why = TARGETS[c["target"]][3]
        lines.append(f"| {c['model']} | {c['what']} | {c['value']:.4g} | {c['threshold']} | "
                     f"{'yes' if c['ok'] else 'NO'} | {why} |")
    return "\n".join(lines)
