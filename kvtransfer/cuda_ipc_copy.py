"""One gather-scatter copy of whole KV blocks: dst[dst_ids[i]] = src[src_ids[i]].

Both caches are seen as [num_blocks, block_len] byte rows (a block of every layer is
one contiguous region). On a GPU the copy is a single Triton kernel launch for all the
requested blocks, however many: program (i, c) moves chunk c of pair i in the widest
machine word that the block length and both base addresses allow, so no temporary
buffer is written and the bytes cross HBM once each way. Elsewhere (and on a GPU
without Triton) it is the plain torch reference, an index_select into a temporary and
an index_copy_.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path still works
    triton = None
    tl = None

WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
MAX_CHUNK_WORDS = 4096  # per program: 32 KiB in 64-bit words
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class CopyGeometry:
    word_bytes: int  # the machine word the kernel moves
    words_per_block: int
    chunk_words: int  # words per program, a power of two
    chunks_per_block: int


def plan_copy(
    block_len: int, src_addr: int, dst_addr: int, max_chunk_words: int = MAX_CHUNK_WORDS
) -> CopyGeometry:
    """How the kernel tiles a block of `block_len` bytes between caches whose block 0 sits at
    `src_addr` and `dst_addr` (every block starts a multiple of block_len further on), at most
    `max_chunk_words` words (a power of two) per program."""
    if block_len < 1:
        raise ValueError(f"a block must hold at least one byte, got block_len {block_len}")
    word = next(w for w in (8, 4, 2, 1) if block_len % w == 0 and src_addr % w == 0 and dst_addr % w == 0)
    words = block_len // word
    chunk = min(max_chunk_words, 1 << (words - 1).bit_length())
    chunks = -(-words // chunk)
    if chunks > MAX_GRID_Y:
        raise ValueError(f"blocks of {block_len} bytes are too large for one copy launch")
    return CopyGeometry(word, words, chunk, chunks)


def check_pairs(src_ids: Sequence[int], dst_ids: Sequence[int], num_src: int, num_dst: int) -> None:
    """ValueError unless the ids pair up, lie inside both caches and no destination repeats
    (two sources written to one block would race)."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source and {len(dst_ids)} destination blocks do not pair up")
    bad_src = [b for b in src_ids if not 0 <= b < num_src]
    if bad_src:
        raise ValueError(f"source block ids {bad_src[:8]} are outside 0..{num_src - 1}")
    bad_dst = [b for b in dst_ids if not 0 <= b < num_dst]
    if bad_dst:
        raise ValueError(f"destination block ids {bad_dst[:8]} are outside 0..{num_dst - 1}")
    if len(set(dst_ids)) != len(dst_ids):
        raise ValueError("destination block ids repeat; each copied block needs its own destination")


class BlockIndex:
    """Reusable buffers for a copy's block ids, laid out [count, src ids.., dst ids..] in
    pinned host memory with a device twin, so that handing the ids to the GPU is one
    asynchronous copy of a fixed buffer (which a CUDA graph can also replay). The source
    ids start at 1 and the destination ids `stride` further on (the capacity unless a copy
    says otherwise: a graph for a bucket of n pairs uses stride n, and uploads 1 + 2n ids).
    One user at a time, who waits for each copy before the next."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(1 + 2 * capacity, dtype=torch.int64, pin_memory=on_gpu)
        self.on_device = torch.zeros_like(self.host, device=device) if on_gpu else self.host
        self._rows = self.host.numpy()

    def fill(self, src_ids: Sequence[int], dst_ids: Sequence[int], stride: int | None = None) -> None:
        """Write the ids into the host buffer (not yet to the device)."""
        n = len(src_ids)
        stride = self.capacity if stride is None else stride
        if n > stride or stride > self.capacity:
            raise ValueError(f"{n} blocks in one copy, more than this index's {min(stride, self.capacity)}")
        rows = self._rows
        rows[0] = n
        rows[1 : 1 + n] = src_ids
        rows[1 + stride : 1 + stride + n] = dst_ids

    def send(self, stride: int | None = None) -> None:
        """Enqueue the copy of the host buffer's first 1 + 2 * stride ids to the device on
        the current stream."""
        if self.on_device is not self.host:
            used = 1 + 2 * (self.capacity if stride is None else stride)
            self.on_device[:used].copy_(self.host[:used], non_blocking=True)

    def views(self, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, source ids, destination ids) on the device, at fixed addresses."""
        c = self.capacity if stride is None else stride
        return self.on_device[0:1], self.on_device[1 : 1 + c], self.on_device[1 + c : 1 + 2 * c]


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for uint8 tensors [num_blocks, block_len]. On CUDA
    it is enqueued on the current stream and returns before it ends; the source may sit on
    another GPU that the destination's reaches by peer access."""
    _check_rows(src, dst)
    check_pairs(src_ids, dst_ids, src.shape[0], dst.shape[0])
    if not src_ids:
        return
    index = BlockIndex(dst.device, len(src_ids))
    index.fill(src_ids, dst_ids)
    index.send()
    if dst.is_cuda and triton_available():
        launch_copy_kernel(src, dst, index, len(src_ids))
    else:
        _, s, d = index.views()
        dst.index_copy_(0, d, src.index_select(0, s))


def launch_copy_kernel(
    src: torch.Tensor,
    dst: torch.Tensor,
    index: BlockIndex,
    grid_pairs: int,
    *,
    max_chunk_words: int = MAX_CHUNK_WORDS,
    num_warps: int | None = None,
    stride: int | None = None,
) -> None:
    """The Triton kernel over `index`'s device buffers, with programs for `grid_pairs` pairs
    (those past the index's count do nothing), reading the ids as `index.fill` wrote them
    with `stride`. Also runs in Triton's interpreter on CPU. The tiling may be overridden (the transfer benchmark's --kernel-sweep compares them)."""
    _check_rows(src, dst)
    geometry = plan_copy(src.shape[1], src.data_ptr(), dst.data_ptr(), max_chunk_words)
    word = WORD_DTYPES[geometry.word_bytes]
    count, src_idx, dst_idx = index.views(stride)
    # on the destination's GPU; a source on another GPU is read by peer access
    with torch.cuda.device(dst.device) if dst.is_cuda else contextlib.nullcontext():
        _kernel()[(grid_pairs, geometry.chunks_per_block)](
            src.view(word),
            dst.view(word),
            count,
            src_idx,
            dst_idx,
            geometry.words_per_block,
            CHUNK=geometry.chunk_words,
            num_warps=num_warps or (8 if geometry.chunk_words >= 2048 else 4),
        )


class GraphedBlockCopy:
    """copy_blocks into one CUDA cache with the host's share cut to a buffer fill and a
    graph launch: per source cache and power-of-two bucket of block counts, the index
    upload and the kernel launch are captured once as a CUDA graph, then replayed (a
    Triton launch from Python costs as long as moving tens of MiB). CUDA events around
    each launch time it on the GPU. Where the driver library allows, the events and the
    graph launch go to it directly, holding the GIL (a few microseconds), so the only
    call that lets other Python threads in is the wait at the end; a thread that loses the
    GIL waits for it to come back, for tens of microseconds when another thread is busy.
    Used from one thread, which calls wait() after each copy before the next."""

    def __init__(self, dst: torch.Tensor, stream: torch.cuda.Stream, *, blocking_wait: bool = False) -> None:
        """blocking_wait: wait() sleeps until the copy ends instead of spinning."""
        self.dst = dst
        self.stream = stream
        self.index = BlockIndex(dst.device, dst.shape[0])
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, int | None]] = {}
        self._begin = torch.cuda.Event(enable_timing=True, blocking=blocking_wait)
        self._end = torch.cuda.Event(enable_timing=True, blocking=blocking_wait)
        self._driver: _DriverCalls | None = None  # set once the events exist (first capture)
        self._pending = False

    def copy(
        self,
        src: torch.Tensor,
        src_ids: Sequence[int],
        dst_ids: Sequence[int],
        phases_ns: dict[str, int] | None = None,
    ) -> None:
        """Enqueue the copy on `stream`; wait() for it before the next. `phases_ns` gets the
        times the ids were checked and packed ("packed") and the graph launched ("launched")."""
        if self._pending:
            raise RuntimeError("the previous copy was not waited for; call wait() after each copy")
        n = len(src_ids)
        if not _pairs_fit(src_ids, dst_ids, src.shape[0], self.dst.shape[0]):
            check_pairs(src_ids, dst_ids, src.shape[0], self.dst.shape[0])  # raises, saying why
        if n == 0:
            return
        bucket = min(1 << (n - 1).bit_length(), self.index.capacity)
        self.index.fill(src_ids, dst_ids, bucket)
        key = (src.data_ptr(), src.shape, bucket)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(src, bucket, key)
        if phases_ns is not None:
            phases_ns["packed"] = time.perf_counter_ns()
        driver = self._driver
        if driver is not None and graph[1] is not None:
            stream = self.stream.cuda_stream
            driver.record(self._begin.cuda_event, stream)
            driver.launch(graph[1], stream)
            driver.record(self._end.cuda_event, stream)
        else:
            with torch.cuda.stream(self.stream):
                self._begin.record(self.stream)
                graph[0].replay()
                self._end.record(self.stream)
        self._pending = True
        if phases_ns is not None:
            phases_ns["launched"] = time.perf_counter_ns()

    def wait(self) -> float:
        """Wait for the last copy to end; its time on the GPU in seconds (CUDA events around
        the graph: the ids' upload and the kernel), 0.0 if there was nothing to copy."""
        if not self._pending:
            return 0.0
        self._pending = False
        driver = self._driver
        if driver is not None:
            driver.synchronize(self._end.cuda_event)
            return driver.elapsed_ms(self._begin.cuda_event, self._end.cuda_event) / 1e3
        self._end.synchronize()
        return self._begin.elapsed_time(self._end) / 1e3

    def forget(self, src: torch.Tensor) -> None:
        """Drop the graphs that read `src` (before its memory goes away)."""
        for key in [k for k in self._graphs if k[0] == src.data_ptr()]:
            del self._graphs[key]

    def _capture(self, src: torch.Tensor, bucket: int, key: tuple) -> tuple[torch.cuda.CUDAGraph, int | None]:
        _check_rows(src, self.dst)
        with torch.cuda.stream(self.stream):
            self.index.send(bucket)
            # compiles outside the capture
            launch_copy_kernel(src, self.dst, self.index, bucket, stride=bucket)
            self._begin.record(self.stream)  # creates the events, in this thread's context
            self._end.record(self.stream)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread-local: the worker's own CUDA work in other threads goes on meanwhile
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.index.send(bucket)
                launch_copy_kernel(src, self.dst, self.index, bucket, stride=bucket)
            finally:
                graph.capture_end()
        try:
            graph_exec = graph.raw_cuda_graph_exec()  # torch 2.6 and later
        except (AttributeError, RuntimeError):
            graph_exec = None  # replayed through torch
        entry = (graph, graph_exec)
        self._driver = _driver_calls()
        self._graphs[key] = entry
        return entry


def _pairs_fit(src_ids: Sequence[int], dst_ids: Sequence[int], num_src: int, num_dst: int) -> bool:
    """check_pairs' conditions, in a few builtin calls (check_pairs says what is wrong)."""
    n = len(src_ids)
    if n != len(dst_ids):
        return False
    if n == 0:
        return True
    return (
        min(src_ids) >= 0
        and max(src_ids) < num_src
        and min(dst_ids) >= 0
        and max(dst_ids) < num_dst
        and len(set(dst_ids)) == n
    )


class _DriverCalls:
    """cuEventRecord, cuGraphLaunch and cuEventElapsedTime from the driver library with the
    GIL held (ctypes.PyDLL: each is a few microseconds of host time), cuEventSynchronize
    with it released (ctypes.CDLL). The calling thread must have used CUDA through torch
    already (its context is then current)."""

    def __init__(self, library: str = "libcuda.so.1") -> None:
        holding = ctypes.PyDLL(library)
        releasing = ctypes.CDLL(library)
        handle = ctypes.c_void_p
        self._record = _declare(holding, "cuEventRecord", [handle, handle])
        self._launch = _declare(holding, "cuGraphLaunch", [handle, handle])
        self._elapsed = _declare(
            holding, "cuEventElapsedTime", [ctypes.POINTER(ctypes.c_float), handle, handle]
        )
        self._synchronize = _declare(releasing, "cuEventSynchronize", [handle])
        self._ms = ctypes.c_float()
        self._ms_ref = ctypes.byref(self._ms)

    def record(self, event: int, stream: int) -> None:
        _status("cuEventRecord", self._record(event, stream))

    def launch(self, graph_exec: int, stream: int) -> None:
        _status("cuGraphLaunch", self._launch(graph_exec, stream))

    def synchronize(self, event: int) -> None:
        _status("cuEventSynchronize", self._synchronize(event))

    def elapsed_ms(self, begin: int, end: int) -> float:
        _status("cuEventElapsedTime", self._elapsed(self._ms_ref, begin, end))
        return self._ms.value


def _declare(library: ctypes.CDLL, name: str, argtypes: list) -> Any:
    function = getattr(library, name)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


def _status(name: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"{name} failed with CUDA driver error {status}; the KV copy did not run")


@functools.cache
def _driver_calls() -> _DriverCalls | None:
    """The driver's entry points, or None where they cannot be loaded (torch's own calls then)."""
    if os.environ.get("PDSERVE_KV_COPY_DRIVER", "1") == "0":
        return None
    try:
        return _DriverCalls()
    except (OSError, AttributeError):
        return None


def _check_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.dtype != torch.uint8 or dst.dtype != torch.uint8 or src.dim() != 2 or dst.dim() != 2:
        raise ValueError("copy_blocks takes uint8 tensors of shape [num_blocks, block_len]")
    if src.shape[1] != dst.shape[1]:
        raise ValueError(f"blocks of {src.shape[1]} bytes cannot be copied into blocks of {dst.shape[1]}")
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("copy_blocks needs contiguous caches")
    if src.device.type != dst.device.type:
        raise ValueError(f"cannot copy blocks from {src.device} to {dst.device}: both must be on CPU or CUDA")


def triton_available() -> bool:
    return triton is not None


def _copy_blocks_kernel(
    src_ptr, dst_ptr, count_ptr, src_idx_ptr, dst_idx_ptr, words_per_block, CHUNK: tl.constexpr
):
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    if pair >= tl.load(count_ptr):  # a graph's bucket may hold more programs than pairs
        return
    src_block = tl.load(src_idx_ptr + pair)  # int64, so the row offsets below are 64-bit
    dst_block = tl.load(dst_idx_ptr + pair)
    offsets = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offsets < words_per_block
    words = tl.load(src_ptr + src_block * words_per_block + offsets, mask=mask)
    tl.store(dst_ptr + dst_block * words_per_block + offsets, words, mask=mask)


@functools.cache
def _kernel_for(interpret: bool):
    return triton.jit(_copy_blocks_kernel)


def _kernel():
    # decorated on first use, so that a test may switch Triton's interpreter on before
    return _kernel_for(bool(triton.knobs.runtime.interpret))
