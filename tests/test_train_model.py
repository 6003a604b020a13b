"""One parameter per expert: same forward as stock transformers, frozen experts get no update."""

from __future__ import annotations

import pytest
import torch

from deltamoe.io import open_checkpoint
from deltamoe.io.provenance import read_manifest
from deltamoe.train import model as M
from deltamoe.train.config import PostPretrainTrainable, RouterReviewTrainable
from deltamoe.train.policy import apply_policy
from deltamoe.ops.upcycle import upcycle

# (variant, layers): Mixtral with one replicated layer, Qwen3 with a dense layer, Qwen2 with its inert shared expert
CASES = [("llama-untied-gqa", "0,2"), ("qwen3-untied", "0-1"), ("qwen2-tied", "all")]


@pytest.fixture(scope="module")
def moes(dense_model, tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("train-model")
    out = {}
    for variant, layers in CASES:
        out[variant] = upcycle(
            dense_model(variant),
            root / variant,
            num_experts=3,
            top_k=2,
            layers=layers,
            allocation={"en": [0], "xx": [1, 2]},
            noise=0.5,
            seed=1,
            progress=False,
        )
    return out


def _load(path):
    ckpt = open_checkpoint(path)
    moe = read_manifest(path)["moe"]
    model, layout = M.load_for_training(ckpt, moe)
    return ckpt, moe, model, layout


@pytest.mark.parametrize("variant", [c[0] for c in CASES])
def test_split_forward_is_bit_identical_to_stock_eager(moes, variant) -> None:
    from transformers import AutoModelForCausalLM

    path = moes[variant]
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    _, _, ours, layout = _load(path)
    assert all(isinstance(lay.experts, M.SplitExperts) for lay in layout.layers)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = stock(ids).logits
        b = ours(ids).logits
    assert torch.equal(a, b)
    # and close to the default (grouped_mm) implementation
    default = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(default(ids).logits, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [c[0] for c in CASES])
def test_layout_maps_every_tensor_and_classifies_groups(moes, variant) -> None:
    ckpt, moe, model, layout = _load(moes[variant])
    assert set(layout.disk_to_mem) == set(ckpt.keys())
    state = model.state_dict()
    for disk, (mem, rows) in layout.disk_to_mem.items():
        t = state[mem] if rows is None else state[mem][rows[0] : rows[1]]
        assert torch.equal(t, ckpt.read(disk).float()), disk
    groups = set(layout.groups.values())
    assert {M.ORIGINAL_EXPERT, M.NEW_EXPERT, M.ROUTER, M.ATTENTION, M.NORM, M.EMBEDDING} <= groups
    if variant.startswith("llama"):
        assert [lay.index for lay in layout.layers if lay.replicated] == [1]
        assert M.REPLICATED_FFN in groups
    if variant.startswith("qwen3"):
        assert M.DENSE_FFN in groups  # layer 2 stays a dense MLP
        assert [lay.index for lay in layout.layers] == [0, 1]
    if variant.startswith("qwen2"):
        inert = [n for n, g in layout.groups.items() if g == M.INERT]
        assert any("shared_expert_gate" in n for n in inert) and any("shared_expert.down_proj" in n for n in inert)


def test_policy_trains_exactly_the_allowed_groups(moes) -> None:
    _, _, model, layout = _load(moes["llama-untied-gqa"])
    s1 = apply_policy(model, layout, PostPretrainTrainable())
    assert {layout.groups[n] for n in s1.trainable_names} == {M.NEW_EXPERT, M.ROUTER}
    # the replicated layer's router and experts never train
    assert not any(".layers.1." in n for n in s1.trainable_names)
    s2 = apply_policy(model, layout, RouterReviewTrainable())
    assert {layout.groups[n] for n in s2.trainable_names} == {M.ROUTER}
    s3 = apply_policy(model, layout, PostPretrainTrainable(attention=True, norms=True, embeddings=True))
    assert {layout.groups[n] for n in s3.trainable_names} == {M.NEW_EXPERT, M.ROUTER, M.ATTENTION, M.NORM, M.EMBEDDING}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(layout.groups[n] in (M.ORIGINAL_EXPERT, M.REPLICATED_FFN) for n in frozen)


@pytest.mark.parametrize("variant", [c[0] for c in CASES])
def test_frozen_experts_stay_bit_identical_under_adamw_with_weight_decay(moes, variant) -> None:
    ckpt, _, model, layout = _load(moes[variant])
    summary = apply_policy(model, layout, PostPretrainTrainable())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 97, (2, 16), generator=gen)
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in summary.trainable_names:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert torch.equal(p, before[n]), f"{n} moved"
            assert p.grad is None  # no gradient was even computed
    # the writer copies frozen tensors only after checking memory still equals the file
    counts = M.write_trained(ckpt, layout, model.state_dict(), set(summary.trainable_names), _empty_dir(moes[variant]))
    assert counts["frozen_verified"] > 0 and counts["frozen_unverified"] == 0


def _empty_dir(path):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(dir=path.parent))


def test_writer_refuses_a_frozen_tensor_that_changed(moes, tmp_path) -> None:
    ckpt, _, model, layout = _load(moes["qwen3-untied"])
    summary = apply_policy(model, layout, RouterReviewTrainable())
    state = model.state_dict()
    state["model.layers.0.mlp.experts.gate_up_0"][0, 0] += 1e-3  # expert 0 moved: a bug must not be written
    with pytest.raises(RuntimeError, match="changed during training"):
        M.write_trained(ckpt, layout, state, set(summary.trainable_names), tmp_path)


def test_router_capture_only_while_active(moes) -> None:
    _, _, model, layout = _load(moes["llama-untied-gqa"])
    cap = M.RouterCapture(layout.routed_layers)
    ids = torch.randint(0, 97, (1, 8))
    model(ids)
    assert cap.logits == {}
    with cap.capture():
        model(ids)
    got = cap.ordered()
    assert [lay.index for lay in layout.routed_layers] == [0, 2] and [t.shape for t in got] == [(8, 3)] * 2
    cap.remove()


def _eager_reference(ex: M.SplitExperts, hidden, top_k_index, top_k_weights):
    """transformers' eager expert loop (one torch.where per expert), on the split parameters."""
    final = torch.zeros_like(hidden)
    mask = torch.nn.functional.one_hot(top_k_index, num_classes=ex.num_experts).permute(2, 1, 0)
    for e in range(ex.num_experts):
        pos, tok = torch.where(mask[e])
        gate, up = torch.nn.functional.linear(hidden[tok], ex.gate_up(e)).chunk(2, dim=-1)
        h = torch.nn.functional.linear(ex.act_fn(gate) * up, ex.down(e)) * top_k_weights[tok, pos, None]
        final.index_add_(0, tok, h)
    return final


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sorted_dispatch_matches_the_eager_loop_and_idle_experts_get_a_gradient(k) -> None:
    gen = torch.Generator().manual_seed(k)
    e, h, i, t = 5, 16, 24, 37
    ex = M.SplitExperts(torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen), torch.nn.SiLU())
    hidden = torch.randn(t, h, generator=gen)
    # expert 4 gets no token at all; the others get uneven shares
    scores = torch.randn(t, e, generator=gen)
    scores[:, 4] = -1e9
    weights, index = torch.topk(scores.softmax(-1), k)
    out = ex(hidden, index, weights)
    assert torch.equal(out, _eager_reference(ex, hidden, index, weights))
    out.square().sum().backward()
    for n, p in ex.named_parameters():
        assert p.grad is not None, n  # every expert ran (DDP needs no find_unused_parameters)
    assert torch.count_nonzero(ex.gate_up(4).grad) == 0 and torch.count_nonzero(ex.gate_up(0).grad) > 0


def _twin_experts(impl: str, seed: int, e: int = 5, h: int = 16, i: int = 24) -> M.SplitExperts:
    gen = torch.Generator().manual_seed(seed)
    gate_up, down = torch.randn(e, 2 * i, h, generator=gen), torch.randn(e, h, i, generator=gen)
    return M.SplitExperts(gate_up, down, torch.nn.SiLU(), impl)


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_mm_matches_eager_values_and_gradients_and_skips_frozen_experts(k) -> None:
    """The grouped-GEMM path (the default on CUDA) computes the eager values and gradients up to
    summation order; a frozen expert gets no gradient, and an expert without tokens a zero one."""
    eager, grouped = _twin_experts("eager", k), _twin_experts("grouped_mm", k)
    for ex in (eager, grouped):
        ex.gate_up(0).requires_grad_(False)
        ex.down(0).requires_grad_(False)
    gen = torch.Generator().manual_seed(10 + k)
    hidden = torch.randn(37, 16, generator=gen)
    scores = torch.randn(37, 5, generator=gen)
    scores[:, 4] = -1e9  # expert 4 gets no token
    weights, index = torch.topk(scores.softmax(-1), k)
    inputs = [(hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)) for _ in range(2)]
    outs = [ex(x, index, w) for ex, (x, w) in zip((eager, grouped), inputs, strict=True)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for out in outs:
        out.square().sum().backward()
    torch.testing.assert_close(inputs[1][0].grad, inputs[0][0].grad, rtol=1e-4, atol=1e-4)  # hidden
    torch.testing.assert_close(inputs[1][1].grad, inputs[0][1].grad, rtol=1e-4, atol=1e-4)  # routing weights
    for (n, pe), (_, pg) in zip(eager.named_parameters(), grouped.named_parameters(), strict=True):
        if n.endswith("_0"):
            assert pe.grad is None and pg.grad is None, n
        else:
            torch.testing.assert_close(pg.grad, pe.grad, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(grouped.gate_up(4).grad) == 0 and torch.count_nonzero(grouped.gate_up(1).grad) > 0


def test_grouped_mm_under_bf16_autocast_returns_float32_gradients() -> None:
    """Mixed precision (precision: bf16): float32 parameters, bf16 products, float32 gradients."""
    eager, grouped = _twin_experts("eager", 3), _twin_experts("grouped_mm", 3)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=gen)
    weights, index = torch.topk(torch.randn(40, 5, generator=gen).softmax(-1), 2)
    outs = []
    for ex in (eager, grouped):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(ex(hidden, index, weights))
        outs[-1].float().square().sum().backward()
    assert outs[1].dtype == outs[0].dtype == torch.float32
    # both round the products to bf16 (8 bits of mantissa): compare relative to the output's size
    assert (outs[1] - outs[0]).norm() / outs[0].norm() < 1e-2
    for (n, pe), (_, pg) in zip(eager.named_parameters(), grouped.named_parameters(), strict=True):
        assert pg.grad.dtype == torch.float32, n
        rel = (pg.grad - pe.grad).norm() / pe.grad.norm()
        assert rel < 2e-2, (n, float(rel))


def test_experts_implementation_choice_and_errors() -> None:
    assert not _twin_experts("auto", 0)._use_grouped(torch.zeros(2, 16))  # auto: CUDA only
    with pytest.raises(M.ArchitectureError, match="hidden 10 and intermediate 24 must be multiples of 4"):
        _twin_experts("grouped_mm", 0, h=10)._use_grouped(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="experts_implementation: 'fast'"):
        _twin_experts("fast", 0)
