"""Exploration for issue 12's CPT sanity miss: a smaller or less parallel new-language share in
pre-training (Llama base + instruct only), then B's multiple choice, P's chat QA and the CPT sanity
check (deltamoe.toy.regime.cpt_sanity: 200 steps on vel). Decision rule, fixed before any result:
a variant is a candidate for the next generator if the CPT check lowers vel perplexity by >= 30 %
AND B's lowest new-language MC >= 0.35 AND the MC gap en - new >= 0.25 AND P's highest new-language
chat QA <= 0.3 and en chat QA >= 0.9."""
import json, sys, time
from pathlib import Path
from deltamoe.toy import build
from deltamoe.toy.config import SIZES
V = {"A": (0.006, 0.65), "B": (0.012, 0.30)}
name = sys.argv[1]
share, par = V[name]
base = SIZES["small"]
cfg = base.model_copy(update={"name": f"small-x{name}", "new_language_share": share, "parallel_share": par,
                              "model2": None, "arch2_post": None, "pretrain2": None, "posts": (base.posts[0],)})
out = Path(f"/work/explore/{name}")
t = time.time()
build(out, cfg, seed=0, progress=False, threads=1)
res = {"variant": name, "new_language_share": share, "parallel_share": par, "build_s": round(time.time() - t)}
from deltamoe.evaluate.run import evaluate
for m in ("base", "instruct"):
    r = evaluate(out / m, "toy", data=out, out=out / "eval-results" / m, progress=False, qa=(m == "instruct"))
    res[m] = {l: {k: r["languages"][l].get(k) for k in ("mc", "qa", "ppl")} for l in r["languages"]}
from deltamoe.toy.regime import cpt_sanity
c = cpt_sanity(out)
res["cpt_vel"] = {k: c[k] for k in ("before", "after", "drop")}
new = ("vel", "kyr", "tol")
mc_new = min(res["base"][l]["mc"] for l in new)
res["checks"] = {"cpt_drop>=0.30": res["cpt_vel"]["drop"] >= 0.30, "B_mc_new_min>=0.35": mc_new >= 0.35,
                 "gap>=0.25": res["base"]["en"]["mc"] - max(res["base"][l]["mc"] for l in new) >= 0.25,
                 "P_qa_new<=0.3": max(res["instruct"][l]["qa"] for l in new) <= 0.3,
                 "P_qa_en>=0.9": res["instruct"]["en"]["qa"] >= 0.9}
res["total_s"] = round(time.time() - t)
(out / "explore.json").write_text(json.dumps(res, indent=2))
print(json.dumps(res, indent=2))
