"""Upcycling is exact: the MoE loaded with stock transformers computes what the dense model computes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from deltamoe.arch import arch_for
from deltamoe.io import Checkpoint
from deltamoe.ops.upcycle import parse_allocation, parse_layers, upcycle
from tiny_models import VARIANTS


def _load(path: Path) -> AutoModelForCausalLM:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    # Every stored tensor must be used and every parameter must come from the file.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {k: ck.read(k) for k in ck.keys()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exact_logits_and_generation(variant: str, dense_model, tmp_path: Path) -> None:
    dense = dense_model(variant)
    ref = _load(dense)
    torch.manual_seed(1)
    x = torch.randint(0, ref.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref_logits = ref(x).logits
        ref_gen = ref.generate(x[:, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
    spec = arch_for(json.loads((dense / "config.json").read_text()))
    for e in (2, 4, 8):
        for k in (1, 2):
            out = upcycle(dense, tmp_path / f"e{e}k{k}", num_experts=e, top_k=k, seed=e * 10 + k, progress=False)
            moe = _load(out)
            assert type(moe).__name__ == spec.moe_architecture
            with torch.no_grad():
                diff = (moe(x).logits - ref_logits).abs().max().item()
                gen = moe.generate(x[:, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert diff <= 1e-5, f"{variant} E={e} K={k}: max |dlogits| = {diff}"
            assert torch.equal(gen, ref_gen), f"{variant} E={e} K={k}: greedy generation differs"
            keys = set(Checkpoint(out).keys())
            for layer in range(ref.config.num_hidden_layers):
                for role in ("gate", "up", "down"):
                    assert spec.dense_name(role, layer) not in keys
                    for ex in range(e):
                        assert spec.expert_name(role, layer, ex) in keys
                    assert spec.expert_name(role, layer, e) not in keys
                assert spec.router_name(layer) in keys


@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen3-bias-tied", "qwen2-bias"])
def test_frozen_tensors_bit_identical_with_perturbed_new_experts(variant: str, dense_model, tmp_path: Path) -> None:
    dense = dense_model(variant)
    spec = arch_for(json.loads((dense / "config.json").read_text()))
    d = _tensors(dense)
    out = upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, noise=0.05, reinit_ratio=0.25, seed=3, progress=False)
    m = _tensors(out)
    ffn_dense = {spec.dense_name(r, l) for r in ("gate", "up", "down") for l in range(3)}
    for name, t in d.items():
        if name in ffn_dense:
            continue
        assert torch.equal(m[name], t) and m[name].dtype == t.dtype, f"{name} changed"
    for layer in range(3):
        for role in ("gate", "up", "down"):
            orig = d[spec.dense_name(role, layer)]
            assert torch.equal(m[spec.expert_name(role, layer, 0)], orig), "expert 0 must be the original FFN"
            for e in (1, 2, 3):
                new = m[spec.expert_name(role, layer, e)]
                assert new.shape == orig.shape and not torch.equal(new, orig), f"expert {e} {role} not perturbed"
    # Drop-Upcycling re-initialises the same intermediate neurons in gate, up and down.
    g_changed = (m[spec.expert_name("gate", 0, 1)] - d[spec.dense_name("gate", 0)]).abs().amax(dim=1)
    dn_changed = (m[spec.expert_name("down", 0, 1)] - d[spec.dense_name("down", 0)]).abs().amax(dim=0)
    big_g = set(torch.topk(g_changed, 12).indices.tolist())  # 25 % of 48 neurons re-initialised
    big_d = set(torch.topk(dn_changed, 12).indices.tolist())
    assert big_g == big_d


def test_noise_is_relative_and_seeded(dense_model, tmp_path: Path) -> None:
    dense = dense_model("llama-untied-gqa")
    spec = arch_for(json.loads((dense / "config.json").read_text()))
    w = Checkpoint(dense).read(spec.dense_name("up", 1))
    a = upcycle(dense, tmp_path / "a", num_experts=3, top_k=1, noise=0.1, seed=5, progress=False)
    b = upcycle(dense, tmp_path / "b", num_experts=3, top_k=1, noise=0.1, seed=6, progress=False)
    na = Checkpoint(a).read(spec.expert_name("up", 1, 2)) - w
    nb = Checkpoint(b).read(spec.expert_name("up", 1, 2)) - w
    assert abs(na.std().item() / w.std().item() - 0.1) < 0.02  # 1536 samples: std of the estimate ~ 2 %
    assert not torch.equal(na, nb)


def test_routers(dense_model, tmp_path: Path) -> None:
    dense = dense_model("qwen3-untied")
    spec = arch_for(json.loads((dense / "config.json").read_text()))
    z = Checkpoint(upcycle(dense, tmp_path / "z", num_experts=4, top_k=2, router_init="zero", progress=False))
    r = Checkpoint(upcycle(dense, tmp_path / "r", num_experts=4, top_k=2, router_std=0.5, seed=1, progress=False))
    assert torch.count_nonzero(z.read(spec.router_name(0))) == 0
    router = r.read(spec.router_name(0))
    assert router.shape == (4, 32)
    assert abs(router.std().item() - 0.5) < 0.1
    assert not torch.equal(router, r.read(spec.router_name(1)))  # per-layer streams


def test_deterministic_bytes(dense_model, tmp_path: Path) -> None:
    dense = dense_model("llama31-rope")
    kw = dict(num_experts=4, top_k=2, noise=0.02, reinit_ratio=0.1, seed=11, progress=False, max_shard_bytes=40_000)
    a = upcycle(dense, tmp_path / "a", **kw)
    b = upcycle(dense, tmp_path / "b", **kw)
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 1, "the small shard budget must produce several shards"
    assert shards == sorted(p.name for p in b.glob("*.safetensors"))
    for name in [*shards, "model.safetensors.index.json", "config.json", "deltamoe.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_layers_subset_qwen_keeps_dense_ffn(dense_model, tmp_path: Path) -> None:
    dense = dense_model("qwen3-untied")
    out = upcycle(dense, tmp_path / "m", num_experts=4, top_k=2, layers="0,2", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [1]
    keys = set(Checkpoint(out).keys())
    assert "model.layers.1.mlp.gate_proj.weight" in keys
    assert not any(k.startswith("model.layers.1.mlp.experts.") for k in keys)
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in keys
    ref, moe = _load(dense), _load(out)
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert (ref(x).logits - moe(x).logits).abs().max().item() <= 1e-5


def test_layers_subset_mixtral_replicates_with_zero_router(dense_model, tmp_path: Path) -> None:
    dense = dense_model("llama-untied-gqa")
    out = upcycle(dense, tmp_path / "m", num_experts=4, top_k=2, layers="1", noise=0.1, progress=False)
    manifest = json.loads((out / "deltamoe.json").read_text())
    assert manifest["moe"]["moe_layers"] == [1] and manifest["moe"]["replicated_layers"] == [0, 2]
    ck = Checkpoint(out)
    assert torch.count_nonzero(ck.read("model.layers.0.block_sparse_moe.gate.weight")) == 0
    e0 = ck.read("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    assert torch.equal(ck.read("model.layers.0.block_sparse_moe.experts.3.w1.weight"), e0)  # no noise there
    assert not torch.equal(
        ck.read("model.layers.1.block_sparse_moe.experts.3.w1.weight"),
        ck.read("model.layers.1.block_sparse_moe.experts.0.w1.weight"),
    )
    ref, moe = _load(dense), _load(out)
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        # layer 1's noisy experts change the output; replicated layers alone would not
        assert (ref(x).logits - moe(x).logits).abs().max().item() > 1e-4


def test_dtype_conversion(dense_model, tmp_path: Path) -> None:
    dense = dense_model("llama-tied")
    out = upcycle(dense, tmp_path / "bf", num_experts=2, top_k=1, dtype="bfloat16", progress=False)
    d, m = _tensors(dense), _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in m.values())
    assert torch.equal(m["model.layers.0.block_sparse_moe.experts.0.w2.weight"], d["model.layers.0.mlp.down_proj.weight"].bfloat16())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_manifest_records_provenance(dense_model, tmp_path: Path) -> None:
    dense = dense_model("mistral-sliding")
    out = upcycle(
        dense, tmp_path / "m", num_experts=3, top_k=2, allocation={"en": [0], "el": [1, 2]},
        progress=False, command=["deltamoe", "upcycle"],
    )
    man = json.loads((out / "deltamoe.json").read_text())
    assert man["stage"] == "upcycle" and man["moe"]["allocation"] == {"en": [0], "el": [1, 2]}
    assert man["moe"]["num_experts"] == 3 and man["moe"]["new_experts"] == [1, 2]
    inp = man["stages"][0]["inputs"]["dense"]
    import hashlib

    for name, digest in inp["files"].items():
        assert hashlib.sha256((dense / name).read_bytes()).hexdigest() == digest
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window"] == 8 and cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    assert (out / "generation_config.json").is_file() and (out / "README.md").is_file()


def test_output_shards_read_back_with_safetensors(dense_model, tmp_path: Path) -> None:
    dense = dense_model("qwen2-bias")
    out = upcycle(dense, tmp_path / "m", num_experts=2, top_k=1, max_shard_bytes=30_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():
                assert index["weight_map"][k] == shard
                total += f.get_tensor(k).numel() * 4
    assert total == index["metadata"]["total_size"]
    # the inert Qwen2-MoE shared expert is exactly zero
    assert re.search(r"shared_expert\.down_proj", " ".join(index["weight_map"]))
    assert torch.count_nonzero(Checkpoint(out).read("model.layers.0.mlp.shared_expert.down_proj.weight")) == 0


def test_parsers() -> None:
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-1,3", 4) == [0, 1, 3]
    assert parse_allocation(["en=0", "el=1,2"]) == {"en": [0], "el": [1, 2]}
    from deltamoe.errors import UsageError

    for bad in ("5", "a", "3-1"):
        with pytest.raises(UsageError, match="--layers"):
            parse_layers(bad, 4)
    for bad in (["en"], ["en=0", "en=1"], ["en=x"]):
        with pytest.raises(UsageError, match="--allocate"):
            parse_allocation(bad)


def test_dense_class_defaults_are_made_explicit(dense_model, tmp_path: Path) -> None:
    """A dense config.json that relies on Llama's defaults must not silently get Mixtral's
    (rms_norm_eps 1e-6 vs 1e-5, rope_theta 1e4 vs 1e6)."""
    import shutil

    dense = tmp_path / "dense"
    shutil.copytree(dense_model("llama-untied-gqa"), dense)
    cfg = json.loads((dense / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "hidden_act"):
        cfg.pop(key, None)
    (dense / "config.json").write_text(json.dumps(cfg))
    out = upcycle(dense, tmp_path / "moe", num_experts=2, top_k=1, progress=False)
    mcfg = json.loads((out / "config.json").read_text())
    assert mcfg["rms_norm_eps"] == 1e-6 and mcfg["rope_theta"] == 10000.0 and mcfg["hidden_act"] == "silu"
    ref, moe = _load(dense), _load(out)
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (ref(x).logits - moe(x).logits).abs().max().item() <= 1e-5


def test_rope_is_stated_for_transformers_4_readers(dense_model, tmp_path: Path) -> None:
    out = upcycle(dense_model("llama31-rope"), tmp_path / "moe", num_experts=2, top_k=1, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
