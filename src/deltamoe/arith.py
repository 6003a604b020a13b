"""Float32 arithmetic for the engine's steps (:mod:`deltamoe.engine`): operands converted once,
results in float32, and per-thread scratch buffers that the steps reuse from one chunk to the next.

Steps compute in float32 and the engine rounds each result once, to the planned output dtype.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import torch

# Elements of one scratch buffer, and of one of the engine's recycled output buffers: one chunk of
# its elementwise work (engine.CHUNK_ELEMS). Larger pieces (whole-tensor work: TIES, DARE) allocate instead.
SCRATCH_ELEMS = 1 << 20


def f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32; a new tensor unless it already is float32 (then ``t`` itself)."""
    return t if t.dtype == torch.float32 else t.float()


class _Scratch(threading.local):
    """Per-thread float32 buffers of one chunk, reused from one step to the next.

    A fresh 4 MB float32 temporary per chunk is served by ``mmap`` (see _memory.py) and costs
    ~1000 page faults on first touch: measured on one core, converting and adding a 1M-element
    bf16 chunk took 3.3 ms with fresh buffers and 1.65 ms in reused ones. Reusing one buffer per
    slot keeps that speed without the ~40 MB of freed heap memory that glibc would otherwise
    keep resident.
    """

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, slot: str, shape: Sequence[int]) -> torch.Tensor | None:
        """A float32 tensor of ``shape`` in ``slot``'s buffer; None when larger than a chunk."""
        n = math.prod(shape)
        if n > SCRATCH_ELEMS:
            return None  # whole-tensor work (TIES/DARE) allocates; a buffer that size would stay
        buf = self.bufs.get(slot)
        if buf is None:
            buf = self.bufs[slot] = torch.empty(SCRATCH_ELEMS, dtype=torch.float32)
        return buf[:n].view(tuple(shape))

    def owns(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(ptr == b.untyped_storage().data_ptr() for b in self.bufs.values())

    def clear(self) -> None:
        self.bufs.clear()


SCRATCH = _Scratch()


class _Pool:
    """Chunk-sized float32 buffers for results that outlive the step computing them (a delta chunk
    shared by the experts of a layer, a piece waiting for the writer), reused once freed.

    Each result is a view of a pooled buffer; the buffer goes back to the pool when the last tensor
    using it is freed, which is tracked exactly: the tensor's storage holds a numpy view of the
    buffer, and that view's finalizer returns the buffer. Measured on the bench's 8-expert graft, a
    fresh 4 MB result per chunk of P - B cost 1.0 s of its 1.8 s (page faults of new mappings).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.free: list[np.ndarray] = []
        self.lock = threading.Lock()

    def empty(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised float32 tensor of ``shape`` (from the pool when it fits a chunk)."""
        n = math.prod(shape)
        if n > SCRATCH_ELEMS:
            return torch.empty(tuple(shape), dtype=torch.float32)
        with self.lock:
            base = self.free.pop() if self.free else None
        if base is None:
            base = np.empty(SCRATCH_ELEMS, dtype=np.float32)
        view = base[:n]
        weakref.finalize(view, self._give_back, base)
        return torch.from_numpy(view).view(tuple(shape))

    def _give_back(self, base: np.ndarray) -> None:
        with self.lock:
            if len(self.free) < self.keep:
                self.free.append(base)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


POOL = _Pool()


def _f32_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 for immediate use as an operand (a scratch copy; ``t`` itself if float32)."""
    if t.dtype == torch.float32:
        return t
    buf = SCRATCH.get("operand", t.shape)
    return t.float() if buf is None else buf.copy_(t)


# Both helpers convert every operand to float32 before the arithmetic: torch's CPU kernels for
# mixed-dtype arithmetic (bf16 + f32) take a scalar slow path, ~10x slower than converting first.
def diff32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` in float32 as a new tensor (never modifies the inputs, which steps may share)."""
    out = POOL.empty(a.shape)
    if a.dtype == torch.float32:
        return torch.sub(a, _f32_operand(b), out=out)
    return out.copy_(a).sub_(_f32_operand(b))


def add32(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, *, scratch: bool = False) -> torch.Tensor:
    """``a + alpha * b`` in float32 (``b`` float32); the inputs are not modified.

    A new tensor, or with ``scratch=True`` (for a step's output piece, which :func:`run_steps`
    consumes before the next step computes) the calling thread's reused output buffer, valid
    until the next ``add32(..., scratch=True)`` on that thread. Same arithmetic either way.
    """
    out = SCRATCH.get("out", a.shape) if scratch else None
    if out is None:
        if a.dtype == torch.float32:
            return torch.add(a, b, alpha=alpha) if alpha != 1 else torch.add(a, b)
        return a.float().add_(b, alpha=alpha) if alpha != 1 else a.float().add_(b)
    out.copy_(a)
    return out.add_(b, alpha=alpha) if alpha != 1 else out.add_(b)
