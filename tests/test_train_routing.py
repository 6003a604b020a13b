"""Language-allocated routing (the router mask) and which tokens the LPR loss covers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_world import base_config, documents, make_moe, write_txt

import deltamoe
from deltamoe.io import open_checkpoint
from deltamoe.train.routing import RouterMask, keep_first, masked_choice, original_languages, route_matrix

ALLOC = {"en": [0], "xx": [1], "yy": [2, 3]}
LANGS = ["en", "xx", "yy"]


def test_route_matrix_is_own_experts_and_the_original_ones() -> None:
    route = route_matrix(ALLOC, LANGS, 4, [0])
    assert route.tolist() == [[True, False, False, False], [True, True, False, False], [True, False, True, True]]
    assert original_languages(ALLOC, [0]) == ["en"]
    assert original_languages({"en": [0], "de": [0, 1], "xx": [2]}, [0]) == ["en"]


@pytest.mark.parametrize("normalise", [True, False])
def test_masked_choice_never_leaves_the_allowed_set(normalise: bool) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g) * 3
    allowed = torch.rand(500, 4, generator=g) > 0.5
    allowed[torch.arange(500), torch.randint(0, 4, (500,), generator=g)] = True  # at least one expert each
    weights, index = masked_choice(logits, allowed, 2, normalise)
    chosen_allowed = allowed.gather(1, index)
    # an expert outside the set is only ever picked to fill top-k, and then with weight exactly 0
    assert torch.all(chosen_allowed | (weights == 0))
    assert torch.all(weights[~chosen_allowed] == 0)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    if normalise:
        assert torch.allclose(weights.sum(-1), torch.ones(500))
    else:  # Qwen3-MoE without norm_topk_prob: the masked probabilities themselves
        assert torch.equal(weights, probs.gather(1, index))


@pytest.mark.parametrize(("variant", "norm"), [("llama-untied-gqa", True), ("qwen3-untied", False),
                                               ("qwen3-untied", True)])
def test_router_mask_on_a_model(tmp_path: Path, variant: str, norm: bool) -> None:
    """Inside ``tokens()`` every router of the model picks only allowed experts for tagged tokens and
    the unmasked choice for untagged ones; outside it, and after ``remove()``, the model is the
    stock model; the routers' logits are unmasked either way."""
    from transformers import AutoModelForCausalLM

    moe = make_moe(tmp_path, variant=variant, experts=4, top_k=2, allocation=ALLOC, noise=0.05)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    routers = [m for n, m in model.named_modules() if n.endswith(".gate") and hasattr(m, "top_k")]
    assert routers
    if hasattr(routers[0], "norm_topk_prob"):  # Qwen3-MoE: both settings of renormalising the top-k
        for r in routers:
            r.norm_topk_prob = norm
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(ids, output_router_logits=True)
    route = route_matrix(ALLOC, LANGS, 4, [0])
    mask = RouterMask(routers, route)
    probes = [r.register_forward_hook(lambda m, a, out: seen.append(out)) for r in routers]  # after the mask
    lang = torch.tensor([-1, 0, 1, 2] * 12)
    with torch.no_grad(), mask.tokens(lang):
        masked = model(ids)
    assert len(seen) == len(routers)
    # the first router's input is the stock one: its logits are the stock, unmasked logits
    assert torch.equal(seen[0][0], stock.router_logits[0].reshape(seen[0][0].shape))
    for logits, weights, index in seen:
        for t in range(lang.numel()):
            if lang[t] < 0:
                assert set(index[t].tolist()) == set(torch.softmax(logits[t], -1).topk(2).indices.tolist())
                continue
            ok = route[lang[t]]
            assert all(bool(ok[e]) or float(w) == 0.0 for e, w in zip(index[t].tolist(), weights[t], strict=True))
        en = lang == 0  # an original-language token: expert 0 with all the weight
        assert torch.all(index[en][weights[en] > 0] == 0)
    assert not torch.equal(masked.logits, stock.logits)
    seen.clear()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock.logits)  # outside tokens(): untouched
    mask.remove()
    for p in probes:
        p.remove()
    with torch.no_grad(), mask.tokens(lang):
        assert torch.equal(model(ids).logits, stock.logits)  # removed: untouched
    with pytest.raises(RuntimeError, match="48 language ids"):
        mask2 = RouterMask(routers, route)
        with torch.no_grad(), mask2.tokens(torch.zeros(48, dtype=torch.long)):
            model(ids[:, :10])


def _expert_keys(moe: Path, expert: int) -> set[str]:
    return {k for k in open_checkpoint(moe).keys() if f".experts.{expert}." in k}


def _changed(a: Path, b: Path) -> set[str]:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    return {k for k in ca.keys() if not ca.read(k).view(torch.uint8).equal(cb.read(k).view(torch.uint8))}


def test_allocated_stage1_trains_only_the_experts_a_language_may_use(tmp_path: Path) -> None:
    """With top-2 of 3 experts, free routing sends xx tokens to expert 2 too and trains it; with
    language-allocated routing (xx -> 1) expert 2 never sees a token and stays bit-identical, as
    expert 0 always does. Gradient checkpointing (which recomputes the forward in backward) gives the
    same bytes."""
    moe = make_moe(tmp_path / "m", experts=3, top_k=2, allocation={"en": [0], "xx": [1]}, noise=0.05)
    xx = write_txt(tmp_path / "xx.txt", documents("xx", 120, 3))
    en = write_txt(tmp_path / "en.txt", documents("en", 120, 4))
    src = [{"path": str(xx), "lang": "xx", "weight": 1}, {"path": str(en), "lang": "en", "weight": 1}]
    free = base_config(moe, tmp_path / "free", src, train={"steps": 6})
    masked = base_config(moe, tmp_path / "masked", src, train={"steps": 6}, routing={"allocated": True})
    masked_gc = base_config(moe, tmp_path / "masked_gc", src, train={"steps": 6, "gradient_checkpointing": True},
                            routing={"allocated": True})
    for c in (free, masked, masked_gc):
        deltamoe.train(c)
    e0, e1, e2 = (_expert_keys(moe, e) for e in range(3))
    free_changed = _changed(moe, tmp_path / "free")
    assert e2 <= free_changed and e1 <= free_changed and not (e0 & free_changed)
    masked_changed = _changed(moe, tmp_path / "masked")
    assert e1 <= masked_changed and not ((e0 | e2) & masked_changed)
    assert not _changed(tmp_path / "masked", tmp_path / "masked_gc")


def test_lpr_tokens_original_keeps_only_original_language_tokens() -> None:
    from deltamoe.train.routing import lpr_tokens as _lpr_tokens

    lang = torch.tensor([-1, 0, 1, 2, 0, 2])
    keep = torch.tensor([True, False, False])
    assert _lpr_tokens(lang, keep).tolist() == [-1, 0, -1, -1, 0, -1]
    assert _lpr_tokens(lang, None) is lang


def test_lpr_tokens_original_changes_training_and_allocated_routing_needs_an_allocation(tmp_path: Path) -> None:
    from deltamoe.errors import UsageError

    moe = make_moe(tmp_path / "m", experts=3, top_k=2, allocation={"en": [0], "xx": [1, 2]}, noise=0.05)
    xx = write_txt(tmp_path / "xx.txt", documents("xx", 80, 3))
    en = write_txt(tmp_path / "en.txt", documents("en", 80, 4))
    src = [{"path": str(xx), "lang": "xx", "weight": 1}, {"path": str(en), "lang": "en", "weight": 1}]
    runs = {}
    for name, losses in (("tagged", {"lpr": 1.0}), ("original", {"lpr": 1.0, "lpr_tokens": "original"})):
        deltamoe.train(base_config(moe, tmp_path / name, src, train={"steps": 4}, losses=losses))
        runs[name] = tmp_path / name
    assert _changed(runs["tagged"], runs["original"])  # the LPR loss saw other tokens
    bare = make_moe(tmp_path / "bare", experts=3, top_k=2, allocation={})
    with pytest.raises(UsageError, match="routing.allocated needs a language -> expert allocation"):
        deltamoe.train(base_config(bare, tmp_path / "x", [{"path": str(xx)}], routing={"allocated": True}))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("normalise", [True, False])
def test_keep_first_drops_each_languages_later_choices(normalise: bool) -> None:
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])
    tagged = torch.tensor([True, True, True, False])
    keep = torch.tensor([1, 2, 3, 1])  # the untagged last token keeps all three whatever keep says
    out = keep_first(weights, tagged, keep, normalise)
    if normalise:
        want = [[1.0, 0.0, 0.0], [5 / 9, 4 / 9, 0.0], [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]
    else:
        want = [[0.6, 0.0, 0.0], [0.5, 0.4, 0.0], [0.7, 0.2, 0.1], [0.4, 0.4, 0.2]]
    assert torch.allclose(out, torch.tensor(want))
    assert torch.equal(out[3], weights[3])


def test_top_k_per_language_on_a_model(tmp_path: Path) -> None:
    """With ``top_k`` per language (no allocation mask), an en token (top_k 1) routes to its best
    expert alone with weight 1, an xx token (the model's top-2) and an untagged token keep the stock
    choice and weights."""
    from transformers import AutoModelForCausalLM

    moe = make_moe(tmp_path, variant="llama-untied-gqa", experts=4, top_k=2, allocation=ALLOC, noise=0.05)
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32).eval()
    routers = [m for n, m in model.named_modules() if n.endswith(".gate") and hasattr(m, "top_k")]
    stock_out: list[tuple[torch.Tensor, ...]] = []
    probe = routers[0].register_forward_hook(lambda m, a, out: stock_out.append(out))
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = model(ids)
    probe.remove()
    mask = RouterMask(routers, torch.ones(3, 4, dtype=torch.bool), torch.tensor([1, 2, 2]))
    seen: list[tuple[torch.Tensor, ...]] = []
    probe = routers[0].register_forward_hook(lambda m, a, out: seen.append(out))  # runs after the mask
    lang = torch.tensor([-1, 0, 1] * 16)
    with torch.no_grad(), mask.tokens(lang):
        masked = model(ids)
    (logits, s_weights, s_index), (_, weights, index) = stock_out[0], seen[0]
    en, other = lang == 0, lang != 0
    assert torch.equal(index[en][:, 0], logits[en].argmax(-1))
    assert torch.equal(weights[en][:, 0], torch.ones(int(en.sum()))) and torch.all(weights[en][:, 1] == 0)
    assert torch.equal(index[other], s_index[other]) and torch.allclose(weights[other], s_weights[other])
    assert not torch.equal(masked.logits, stock.logits)
    mask.remove()
    probe.remove()


def test_top_k_per_language_trains_and_refuses_bad_values(tmp_path: Path) -> None:
    from deltamoe.errors import UsageError
    from deltamoe.train.config import RoutingConfig

    assert RoutingConfig().model_dump() == {"allocated": False}  # the default leaves digests as they were
    moe = make_moe(tmp_path / "m", experts=3, top_k=2, allocation={"en": [0], "xx": [1, 2]}, noise=0.05)
    xx = write_txt(tmp_path / "xx.txt", documents("xx", 80, 3))
    en = write_txt(tmp_path / "en.txt", documents("en", 80, 4))
    src = [{"path": str(xx), "lang": "xx", "weight": 1}, {"path": str(en), "lang": "en", "weight": 1}]
    deltamoe.train(base_config(moe, tmp_path / "free", src, train={"steps": 4}))
    deltamoe.train(base_config(moe, tmp_path / "k1", src, train={"steps": 4}, routing={"top_k": {"xx": 1}}))
    assert _changed(tmp_path / "free", tmp_path / "k1")  # xx tokens ran on one expert, not two
    assert not (_expert_keys(moe, 0) & _changed(moe, tmp_path / "k1"))  # expert 0 stays frozen
    for top_k, message in (({"zz": 1}, "routing.top_k.zz: 'zz' is not one of the model's languages"),
                           ({"xx": 3}, r"routing.top_k.xx = 3: more than the model's top-k \(2\)"),
                           ({"xx": 0}, "top_k.xx = 0: a token needs at least one expert")):
        with pytest.raises(UsageError, match=message):
            deltamoe.train(base_config(moe, tmp_path / "bad", src, routing={"top_k": top_k}))
        assert not (tmp_path / "bad").exists()
