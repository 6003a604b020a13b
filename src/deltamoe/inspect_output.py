"""What ``deltamoe inspect`` reports: accumulated dot products, the rows of its table, the plot.

:class:`Acc` holds three float64 sums (U·U, Δ·Δ, U·Δ) for one tensor, filled chunk by chunk;
rows of the table are sums of those accumulators over the tensors of a group, so a group's
cosine is the cosine of its tensors laid end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Display order of the tensor groups inside a layer; other groups follow alphabetically.
GROUP_ORDER = ("embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "norm", "lm_head")


@dataclass
class Acc:
    """Float64 sums over the elements of the tensors seen so far: U·U, Δ·Δ and U·Δ."""

    uu: float = 0.0
    dd: float = 0.0
    ud: float = 0.0
    numel: int = 0

    def add(self, u: torch.Tensor, d64: torch.Tensor, dd: float) -> None:
        """Add one chunk: ``u`` (any float dtype), ``d64`` the matching Δ chunk, flat float64, ``dd`` its Δ·Δ."""
        u64 = u.reshape(-1).double()
        self.uu += float(torch.dot(u64, u64))
        self.ud += float(torch.dot(u64, d64))
        self.dd += dd
        self.numel += u64.numel()

    def merge(self, other: Acc) -> None:
        self.uu += other.uu
        self.dd += other.dd
        self.ud += other.ud
        self.numel += other.numel

    def stats(self) -> dict[str, Any]:
        """‖U‖, ‖Δ‖, ‖U‖/‖Δ‖ and cos(U, Δ); ratio and cosine are None where undefined (a zero norm)."""
        un, dn = math.sqrt(self.uu), math.sqrt(self.dd)
        cos = self.ud / (un * dn) if un > 0 and dn > 0 else None
        if cos is not None:
            cos = max(-1.0, min(1.0, cos))  # rounding may step just outside [-1, 1]
        return {"numel": self.numel, "u_norm": un, "delta_norm": dn, "ratio": un / dn if dn > 0 else None,
                "cosine": cos, "frozen": self.uu == 0.0}


@dataclass(frozen=True)
class Target:
    """One tensor measured: where it sits (layer, group, expert) and what U and Δ are there."""

    name: str  # the tensor of the updated model (B' or M)
    layer: int | None
    group: str
    kind: str  # "dense" (B' - B), "shared" (M - B), "expert" (M_e - M_0 for e >= 1, M_0 - B for e = 0)
    expert: int | None = None
    delta_name: str = ""  # the tensor of B and P whose Δ it is compared with
    acc: Acc = field(default_factory=Acc, compare=False)

    @property
    def update(self) -> str:
        if self.kind == "dense":
            return "B' - B"
        if self.kind == "expert" and self.expert:
            return "M_e - M_0"
        return "M - B"


def _order(layer: int | None, group: str) -> tuple[int, int, int, str]:
    rank = GROUP_ORDER.index(group) if group in GROUP_ORDER else len(GROUP_ORDER)
    place = 0 if layer is None and group == "embed" else (1 if layer is not None else 2)
    return (place, layer or 0, rank, group)


def _row(key: dict[str, Any], accs: list[Target]) -> dict[str, Any]:
    acc = Acc()
    for t in accs:
        acc.merge(t.acc)
    return {**key, "tensors": [t.name for t in accs], **acc.stats()}


def table_rows(targets: list[Target]) -> list[dict[str, Any]]:
    """One row per (layer, group, expert): the measured tensors of that group summed."""
    groups: dict[tuple[Any, ...], list[Target]] = {}
    for t in targets:
        groups.setdefault((t.layer, t.group, t.kind, t.expert), []).append(t)
    keys = sorted(groups, key=lambda k: (*_order(k[0], k[1]), -1 if k[3] is None else k[3]))
    return [_row({"layer": k[0], "group": k[1], "kind": k[2], "expert": k[3], "update": groups[k][0].update},
                 groups[k]) for k in keys]


def _which(t: Target) -> str:
    if t.kind != "expert":
        return t.kind
    return "expert 0" if t.expert == 0 else "new experts"


def summary_rows(targets: list[Target]) -> list[dict[str, Any]]:
    """The table with the new experts of a group taken together (what is printed and plotted)."""
    groups: dict[tuple[Any, ...], list[Target]] = {}
    for t in targets:
        groups.setdefault((t.layer, t.group, _which(t)), []).append(t)
    rank = {"dense": 0, "shared": 0, "expert 0": 1, "new experts": 2}
    keys = sorted(groups, key=lambda k: (*_order(k[0], k[1]), rank[k[2]]))
    out = []
    for k in keys:
        experts = sorted({t.expert for t in groups[k] if t.expert is not None})
        out.append(_row({"layer": k[0], "group": k[1], "which": k[2], "experts": experts}, groups[k]))
    return out


def totals(targets: list[Target]) -> dict[str, dict[str, Any]]:
    """The whole model, and per kind of tensor (shared, expert 0, new experts; or dense)."""
    out = {"all": _row({}, targets)}
    for which in ("dense", "shared", "expert 0", "new experts"):
        mine = [t for t in targets if _which(t) == which]
        if mine:
            out[which] = _row({}, mine)
    for row in out.values():
        del row["tensors"]
    return out


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(result: dict[str, Any]) -> str:
    """The summary rows as plain text: one line per layer, group and kind of update."""
    head = f"{'layer':>5}  {'group':<10} {'update':<12} {'|U|':>10} {'|Δ|':>10} {'|U|/|Δ|':>9} {'cos(U,Δ)':>9}"
    lines = [head, "-" * len(head)]
    for r in result["summary"]:
        layer = "-" if r["layer"] is None else str(r["layer"])
        which = r["which"] if r["which"] != "new experts" else f"experts {_span(r['experts'])}"
        cos = "frozen" if r["frozen"] else _num(r["cosine"], "+.4f")
        lines.append(f"{layer:>5}  {r['group']:<10} {which:<12} {r['u_norm']:>10.4g} {r['delta_norm']:>10.4g} "
                     f"{_num(r['ratio'], '.4g'):>9} {cos:>9}")
    lines.append("-" * len(head))
    for which, t in result["totals"].items():
        if which == "dense":
            continue  # the same as "all"
        cos = "frozen" if t["frozen"] else _num(t["cosine"], "+.4f")
        lines.append(f"{'total':>5}  {'':<10} {which:<12} {t['u_norm']:>10.4g} {t['delta_norm']:>10.4g} "
                     f"{_num(t['ratio'], '.4g'):>9} {cos:>9}")
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)


def _span(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))


def plot(result: dict[str, Any], path: Path) -> None:
    """Per layer: cos(U, Δ) of every tensor group (top) and ‖U‖/‖Δ‖ (bottom, log scale)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    series: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for r in result["summary"]:
        if r["layer"] is None:
            continue
        label = r["group"] if r["which"] in ("dense", "shared") else f"{r['group']} ({r['which']})"
        series.setdefault(label, []).append((r["layer"], r["cosine"], r["ratio"] if not r["frozen"] else None))
    drawn = {k: v for k, v in series.items() if any(p[2] for p in v)}
    frozen = set(series) - set(drawn)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for label, pts in drawn.items():
        cos = [(x, c) for x, c, _ in pts if c is not None]
        ratio = [(x, q) for x, _, q in pts if q]
        top.plot([p[0] for p in cos], [p[1] for p in cos], marker=".", label=label)
        bottom.plot([p[0] for p in ratio], [p[1] for p in ratio], marker=".", label=label)
    top.axhline(0.0, color="grey", linewidth=0.6)
    top.set_ylim(-1.05, 1.05)
    top.set_ylabel("cos(U, Δ)")
    title = f"U = {result['update']}, Δ = {result['delta']}"
    if frozen:
        title += "\n" + textwrap.fill(f"not drawn, U = 0 (frozen): {', '.join(sorted(frozen))}", 110)
    top.set_title(title, fontsize=9)
    if drawn:
        bottom.set_yscale("log")
        ratios = [q for pts in drawn.values() for _, _, q in pts if q]
        narrow = max(ratios) < 10 * min(ratios)  # within a decade: label the minor ticks too
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if narrow else ""))
        top.legend(fontsize=7, ncol=2)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("‖U‖ / ‖Δ‖")
    bottom.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
