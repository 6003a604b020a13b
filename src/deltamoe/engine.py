"""The streaming tensor engine shared by ``graft``, ``delta extract`` and ``merge``.

A job is planned before any data is read: the output layout (names, dtypes, shapes) comes
from the input headers, and the work is a lazy sequence of :class:`Step` s. A step names the
row ranges of stored tensors it needs (:class:`Read`) and a ``compute`` function that turns
them into row ranges of output tensors. Elementwise work (graft, ParamΔ, task arithmetic,
delta extraction) is split into row chunks of a few MB, so memory use depends on the chunk
size and the read-ahead budget, not on the size of the model or of its largest tensor.

Three things run at once: a reader thread maps the inputs of the next steps (:class:`_Reader`), the
calling thread computes, and a writer thread ``pwrite`` s finished chunks to their final place in the
output shards. All three spend their time in system calls or torch kernels that release the
GIL. Results are computed in float32, checked for NaN/Inf (an error names the input tensor and
file that holds them) and rounded once, to the planned output dtype, just before writing;
chunks that pass through unchanged are never converted at all.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltamoe._memory import return_large_frees_to_os
from deltamoe.arith import POOL, SCRATCH, SCRATCH_ELEMS
from deltamoe.io import Checkpoint, ShardedWriter, TensorSpec, torch_dtype
from deltamoe.io.ranges import RangeReader
from deltamoe.io.ranges import row_bytes as _row_bytes
from deltamoe.errors import CheckpointError

# Elements per chunk of elementwise work: 1M elements = 4 MB in float32. Big enough that
# per-chunk overhead (a system call, a few kernel launches) is negligible, small enough that
# several chunks in flight stay far below the size of one large embedding matrix. At this size
# float32 temporaries are mmap'd (see _memory.py) and unmapped when freed, so peak memory
# follows the buffers in flight; 2 MB chunks reuse heap memory (fewer page faults, same speed
# within noise on 2 cores) but leave ~40 MB more resident.
CHUNK_ELEMS = 1 << 20
# Default bytes of input read ahead and of output waiting to be written (each): a quarter of
# the largest output tensor, between these bounds. Reads come from the page cache or a disk's
# own read-ahead, so a few chunks in flight keep the threads busy; the bound keeps the engine's
# memory a fraction of the largest tensor on small models too (memory goal: 2 x largest + 300 MB).
DEFAULT_BUFFER_BYTES = 32 * 2**20
MIN_BUFFER_BYTES = 4 * 2**20


def auto_buffer_bytes(planned: dict[str, TensorSpec]) -> int:
    largest = max((s.nbytes for s in planned.values()), default=0)
    return max(MIN_BUFFER_BYTES, min(DEFAULT_BUFFER_BYTES, largest // 4))

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Read:
    """Rows ``start:stop`` (along dim 0) of one stored tensor; ``None`` bounds mean the whole tensor."""

    ckpt: Checkpoint
    name: str
    start: int | None = None
    stop: int | None = None

    @property
    def key(self) -> tuple[str, str, int | None, int | None]:
        return (str(self.ckpt.path), self.name, self.start, self.stop)

    @property
    def nbytes(self) -> int:
        spec = self.ckpt.spec(self.name)
        if self.start is None:
            return spec.nbytes
        return (self.stop - self.start) * _row_bytes(spec)  # type: ignore[operator]


# One piece of output: (tensor name, first row or None for the whole tensor, values).
Out = tuple[str, "int | None", torch.Tensor]


@dataclass(frozen=True)
class Step:
    """Read ``reads`` (deduplicated), then ``compute(tensors)`` yields output pieces.

    Steps run in order on the calling thread, so a compute function may keep state for
    later steps (e.g. a delta chunk shared by all experts of a layer).
    """

    reads: Sequence[Read]
    compute: Callable[[list[torch.Tensor]], Iterable[Out]]
    # Check the inputs for NaN/Inf before computing: for computations that can drop a non-finite
    # entry (TIES's sign election, magnitude pruning), where checking the result is not enough.
    check_inputs: bool = False


def row_chunks(shape: Sequence[int], start: int = 0, stop: int | None = None) -> list[tuple[int | None, int | None]]:
    """Row ranges covering rows ``start:stop`` of a tensor of ``shape``, ~CHUNK_ELEMS elements each.

    A scalar or empty tensor is one piece ``(None, None)``: the whole tensor.
    """
    if not shape or (shape[0] == 0 and start == 0):
        return [(None, None)]
    stop = shape[0] if stop is None else stop
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, CHUNK_ELEMS // per_row)
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def is_float(code: str) -> bool:
    return code in FLOAT_CODES


class _Recycled:
    """Buffers for the rounded output pieces, handed back by the writer and reused.

    Each rounded piece used to be a fresh allocation that the writer thread freed: glibc returns
    the memory to the OS and the next piece faults it in again, page by page (measured on the
    8-expert bench graft: 0.4-1.5 M minor faults, most of its 7-13 s of system time). A few
    chunk-sized buffers per output dtype, as many as the write budget can hold in flight, keep
    the speed and bound the memory; pieces larger than a chunk are allocated as before.
    """

    def __init__(self, buffer_bytes: int) -> None:
        self.buffer_bytes = buffer_bytes
        self.free: dict[torch.dtype, list[torch.Tensor]] = {}
        self.lock = threading.Lock()

    def cast(self, t: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``t`` rounded to ``dt`` (a copy), in a recycled buffer when it fits one; and that buffer."""
        if t.numel() > SCRATCH_ELEMS:  # larger than a chunk (whole-tensor work): allocated, not kept
            return (t.to(dt) if t.dtype != dt else t.clone()), None
        with self.lock:
            free = self.free.get(dt)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(SCRATCH_ELEMS, dtype=dt)
        out = buf[: t.numel()].view(t.shape)
        out.copy_(t)  # the same rounding as t.to(dt)
        return out, buf

    def give_back(self, buf: torch.Tensor) -> None:
        keep = self.buffer_bytes // (SCRATCH_ELEMS * buf.dtype.itemsize) + 2  # the most in flight, and one each side
        with self.lock:
            free = self.free.setdefault(buf.dtype, [])
            if len(free) < keep:
                free.append(buf)


class _Reader(RangeReader):
    """The engine's reads: :class:`Read` s, each mapped or read by :class:`~deltamoe.io.ranges.RangeReader`."""

    def read(self, r: Read) -> torch.Tensor:
        return self.read_rows(r.ckpt, r.name, r.start, r.stop)


def _finite(t: torch.Tensor) -> bool:
    # One reduction pass: NaN and Inf propagate into the sum. The sum of finite values can
    # overflow too, so a non-finite sum is confirmed elementwise before anyone is blamed.
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return True
    return bool(torch.isfinite(t).all())


def check_finite_tensors(ckpt: Checkpoint, names: Iterable[str] | None = None) -> None:
    """Refuse NaN/Inf in the floating-point tensors of ``ckpt``, read in row chunks (bounded memory);
    the error names the tensor, the file and the first bad index."""
    reader = _Reader()
    try:
        for name in names if names is not None else ckpt.keys():
            spec = ckpt.spec(name)
            if not is_float(spec.dtype):
                continue
            for a, b in row_chunks(spec.shape):
                r = Read(ckpt, name, a, b)
                t = reader.read(r)
                if not _finite(t):
                    raise _blame(Step([r], lambda ts: []), [t], name)
    finally:
        reader.close()


def _blame(step: Step, tensors: list[torch.Tensor], name: str) -> CheckpointError:
    """The error for a non-finite result: name the input tensor (and file) that holds NaN/Inf."""
    for r, t in zip(step.reads, tensors):
        if not t.is_floating_point() or _finite(t):
            continue
        bad = (~torch.isfinite(t)).nonzero()
        idx = bad[0].tolist()
        value = t[tuple(idx)].item()
        if r.start is not None and idx:
            idx[0] += r.start
        return CheckpointError(
            f"{r.ckpt.tensors[r.name].file}: tensor {r.name!r} contains {int(bad.shape[0])} non-finite value(s) "
            f"(first: {value} at index {idx}); the checkpoint is corrupt or diverged, refusing to use it"
        )
    return CheckpointError(
        f"output tensor {name!r}: the result is not finite although its inputs are (it overflows float32); "
        "check the scale/weights"
    )


def byte_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A progress bar over ``total`` bytes on stderr, shown only with ``progress``."""
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr)


def run_steps(
    steps: Iterable[Step],
    writer: ShardedWriter,
    planned: dict[str, TensorSpec],
    *,
    buffer_bytes: int | None = None,
    check_finite: bool = True,
    progress: bool = True,
    desc: str = "deltamoe",
) -> None:
    """Execute ``steps``: read ahead on one thread, compute here, write on another.

    ``planned`` maps each output name to its spec: computed pieces are rounded to that dtype
    (once) and must have its shape. At most ``buffer_bytes`` of inputs are read ahead and at
    most ``buffer_bytes`` of outputs wait for the writer, beyond the step being computed
    (default: :func:`auto_buffer_bytes`).
    Raises the first error of any of the three threads; the caller aborts the writer.
    """
    return_large_frees_to_os()  # chunk buffers are freed back to the OS, not kept in the heap
    if buffer_bytes is None:
        buffer_bytes = auto_buffer_bytes(planned)
    run = _Run(iter(steps), writer, planned, buffer_bytes, check_finite,
               byte_bar(sum(s.nbytes for s in planned.values()), desc, progress))
    # The pipeline keeps a reader, a writer and a hashing thread busy beside the computation.
    # Leave them a core: torch's OpenMP workers spin-wait between kernels, and on a small
    # machine they would spin on the cores the I/O threads need (measured on 2 cores: 2.5x
    # the CPU time of one compute thread, and slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 2)))
    try:
        run.run()
    finally:
        SCRATCH.clear()
        POOL.clear()
        torch.set_num_threads(threads)
        run.close()


class _Run:
    """One :func:`run_steps`: the steps whose reads are queued, the pieces being written, and
    the bytes of each (bounded by ``buffer_bytes``)."""

    def __init__(self, steps: Iterator[Step], writer: ShardedWriter, planned: dict[str, TensorSpec],
                 buffer_bytes: int, check_finite: bool, bar: tqdm) -> None:
        self.steps, self.writer, self.planned = steps, writer, planned
        self.buffer_bytes, self.check_finite, self.bar = buffer_bytes, check_finite, bar
        self.reader = _Reader()
        self.read_pool = ThreadPoolExecutor(1, thread_name_prefix="deltamoe-read")
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="deltamoe-write")
        self.reads_ahead: deque[tuple[Step, list[int], Future[list[torch.Tensor]], int]] = deque()
        self.writes: deque[tuple[Future[None], int]] = deque()
        self.read_bytes = self.write_bytes = 0
        self.recycled = _Recycled(buffer_bytes)

    def run(self) -> None:
        self.fill()
        while self.reads_ahead:
            step, index, fut, nbytes = self.reads_ahead.popleft()
            uniq = fut.result()
            self.read_bytes -= nbytes
            self.fill()
            tensors = [uniq[i] for i in index]
            del uniq
            self.compute(step, tensors)
            del tensors
        while self.writes:
            self.retire()

    def fill(self) -> None:
        """Queue reads until the read-ahead budget is used (always at least one step)."""
        while not self.reads_ahead or self.read_bytes < self.buffer_bytes:
            step = next(self.steps, None)
            if step is None:
                return
            keys: dict[tuple, int] = {}
            uniq: list[Read] = []
            index = []
            for r in step.reads:
                k = r.key
                if k not in keys:
                    keys[k] = len(uniq)
                    uniq.append(r)
                index.append(keys[k])
            nbytes = sum(r.nbytes for r in uniq)
            self.reads_ahead.append((step, index, self.read_pool.submit(self.fetch, uniq), nbytes))
            self.read_bytes += nbytes

    def fetch(self, uniq: list[Read]) -> list[torch.Tensor]:
        return [self.reader.read(r) for r in uniq]

    def compute(self, step: Step, tensors: list[torch.Tensor]) -> None:
        """Compute ``step`` from its inputs; check, round and queue every piece for the writer."""
        if self.check_finite and step.check_inputs and not all(_finite(t) for t in tensors if t.is_floating_point()):
            raise _blame(step, tensors, "(inputs)")
        outs = list(step.compute(tensors))
        if sum(SCRATCH.owns(t) for _, _, t in outs) > 1:
            raise RuntimeError("a step yielded several pieces in the scratch buffer (add32(scratch=True)); "
                               "this is a deltamoe bug")
        for name, start, t in outs:
            # NaN/Inf in any input reaches some output: checking the outputs (in float32,
            # before rounding) covers the inputs at a fraction of the cost of checking them.
            if self.check_finite and t.is_floating_point() and not _finite(t):
                raise _blame(step, tensors, name)
            dt = torch_dtype(self.planned[name].dtype)
            buf = None
            if t.dtype != dt or SCRATCH.owns(t):
                # the one rounding to the output dtype; a scratch piece is copied because the writer
                # runs later and the next step reuses the scratch buffer
                t, buf = self.recycled.cast(t, dt)
            self.queue_write(name, start, t, buf)
            del t, buf

    def queue_write(self, name: str, start: int | None, t: torch.Tensor, buf: torch.Tensor | None = None) -> None:
        # Bound the output waiting for the writer; surface writer errors early.
        while self.writes and (self.writes[0][0].done() or self.write_bytes + t.nbytes > self.buffer_bytes):
            self.retire()
        self.writes.append((self.write_pool.submit(self.write, name, start, t, buf), t.nbytes))
        self.write_bytes += t.nbytes

    def retire(self) -> None:
        """Wait for the oldest write (raising its error, if any)."""
        wf, wn = self.writes.popleft()
        wf.result()
        self.write_bytes -= wn
        self.bar.update(wn)

    def write(self, name: str, start: int | None, t: torch.Tensor, buf: torch.Tensor | None) -> None:
        if start is None:
            self.writer.write(name, t)
        else:
            self.writer.write_rows(name, start, t)
        if buf is not None:
            del t  # the piece is a view of buf: written, so buf is free
            self.recycled.give_back(buf)

    def close(self) -> None:
        for pending in [*(x[2] for x in self.reads_ahead), *(w[0] for w in self.writes)]:
            pending.cancel()
        self.read_pool.shutdown(wait=True)
        self.write_pool.shutdown(wait=True)
        self.reader.close()
        self.bar.close()
