"""Own-expert top-1 shares of an MoE checkpoint, split into the tokens a language shares with the
other languages and the tokens only it uses (a diagnostic of the routing screens).

    python scripts/routing_by_token.py TOY_DIR CHECKPOINT [CHECKPOINT ...] [--json OUT.json]

A token of language L counts as *shared* when its id also occurs in another language's held-out
text (``eval/<lang>/ppl.jsonl``, the text ``deltamoe eval`` measures routing on): punctuation, the
Q/A markers and the people's names, which every toy language writes alike. The router of a layer
sees a shared token's embedding plus what attention adds, so a router that mostly reads the token
itself cannot send a shared token to every language's own expert at once. Own experts are the
checkpoint's allocation (``deltamoe.json``); shares use the same top-1 as ``deltamoe eval`` (the
first of the top-k of the float softmax).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _texts(toy: Path, lang: str) -> list[str]:
    with (toy / "eval" / lang / "ppl.jsonl").open() as f:
        return [json.loads(line)["text"] for line in f]


def _allocation(ckpt: Path) -> dict[str, list[int]]:
    alloc = (json.loads((ckpt / "deltamoe.json").read_text()).get("moe") or {}).get("allocation")
    if alloc:
        return {k: [int(e) for e in v] for k, v in alloc.items()}
    sys.exit(f"error: {ckpt / 'deltamoe.json'}: no language allocation recorded; give an upcycled, allocated MoE")


@torch.no_grad()
def shares(toy: Path, ckpt: Path, batch_size: int = 32) -> dict[str, dict[str, list[float] | float]]:
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    alloc = _allocation(ckpt)
    langs = list(alloc)
    texts = {lang: _texts(toy, lang) for lang in langs}
    ids = {lang: set(i for t in texts[lang] for i in tok(t, add_special_tokens=False)["input_ids"]) for lang in langs}
    out: dict[str, dict[str, list[float] | float]] = {}
    for lang in langs:
        others = set().union(*(ids[o] for o in langs if o != lang))
        own = torch.tensor(alloc[lang])
        hits: dict[str, torch.Tensor] = {}
        counts = {"shared": 0, "own": 0}
        for start in range(0, len(texts[lang]), batch_size):
            enc = tok(texts[lang][start:start + batch_size], return_tensors="pt", padding=True)
            res = model(**enc, output_router_logits=True)
            mask = enc["attention_mask"].bool().reshape(-1)
            flat_ids = enc["input_ids"].reshape(-1)[mask]
            shared = torch.tensor([int(i) in others for i in flat_ids])
            for layer, logits in enumerate(res.router_logits):
                lg = logits.reshape(-1, logits.shape[-1])[mask]
                first = torch.softmax(lg.float(), dim=-1).topk(model.config.num_experts_per_tok, dim=-1).indices[:, 0]
                good = torch.isin(first, own)
                for name, sel in (("shared", shared), ("own", ~shared)):
                    key = f"{name}{layer}"
                    hits[key] = hits.get(key, torch.zeros((), dtype=torch.long)) + good[sel].sum()
            counts["shared"] += int(shared.sum())
            counts["own"] += int((~shared).sum())
        n_layers = len(res.router_logits)
        total = counts["shared"] + counts["own"]
        row: dict[str, list[float] | float] = {"shared_fraction": round(counts["shared"] / total, 4)}
        for name in ("shared", "own"):
            row[name] = [round(float(hits[f"{name}{i}"]) / max(counts[name], 1), 4) for i in range(n_layers)]
        row["all"] = [round((float(hits[f"shared{i}"]) + float(hits[f"own{i}"])) / total, 4) for i in range(n_layers)]
        out[lang] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("toy", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {}
    for ckpt in args.checkpoints:
        report[str(ckpt)] = res = shares(args.toy, ckpt)
        print(ckpt)
        for lang, row in res.items():
            print(f"  {lang}: shared {row['shared_fraction']:.2f} of tokens | own-expert top-1 per layer: "
                  f"shared tokens {row['shared']}, the language's own tokens {row['own']}, all {row['all']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
