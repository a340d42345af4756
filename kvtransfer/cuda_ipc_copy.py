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
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
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


def plan_copy(block_len: int, src_addr: int, dst_addr: int) -> CopyGeometry:
    """How the kernel tiles a block of `block_len` bytes between caches whose block 0 sits at
    `src_addr` and `dst_addr` (every block starts a multiple of block_len further on)."""
    if block_len < 1:
        raise ValueError(f"a block must hold at least one byte, got block_len {block_len}")
    word = next(w for w in (8, 4, 2, 1) if block_len % w == 0 and src_addr % w == 0 and dst_addr % w == 0)
    words = block_len // word
    chunk = min(MAX_CHUNK_WORDS, 1 << (words - 1).bit_length())
    chunks = -(-words // chunk)
    if chunks > MAX_GRID_Y:
        raise ValueError(f"blocks of {block_len} bytes are too large for one copy launch")
    return CopyGeometry(word, words, chunk, chunks)


def check_pairs(src_ids: Sequence[int], dst_ids: Sequence[int], num_src: int, num_dst: int) -> None:
    """ValueError unless the ids pair up, lie inside both caches and no destination repeats
    (two sources written to one block would race)."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source and {len(dst_ids)} destination blocks do not pair up")
    _check_ids(np.asarray(src_ids, dtype=np.int64), np.asarray(dst_ids, dtype=np.int64), num_src, num_dst)


def _check_ids(src: np.ndarray, dst: np.ndarray, num_src: int, num_dst: int) -> None:
    """check_pairs over arrays of equal length, without a Python loop over the ids."""
    if not len(src):
        return
    if src.min() < 0 or src.max() >= num_src:
        bad = src[(src < 0) | (src >= num_src)]
        raise ValueError(f"source block ids {bad[:8].tolist()} are outside 0..{num_src - 1}")
    if dst.min() < 0 or dst.max() >= num_dst:
        bad = dst[(dst < 0) | (dst >= num_dst)]
        raise ValueError(f"destination block ids {bad[:8].tolist()} are outside 0..{num_dst - 1}")
    if len(dst) > 1 and np.unique(dst).size != len(dst):
        raise ValueError("destination block ids repeat; each copied block needs its own destination")


class BlockIndex:
    """A reusable buffer for a copy's block ids, laid out [count, src0, dst0, src1, dst1, ..]
    in pinned host memory with a device twin, so that handing the ids to the GPU is one
    asynchronous copy of the buffer's first 1 + 2 * n entries (which a CUDA graph can also
    replay). Its user waits for a copy to have read the buffer before filling it again."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(1 + 2 * capacity, dtype=torch.int64, pin_memory=on_gpu)
        self.on_device = torch.zeros_like(self.host, device=device) if on_gpu else self.host
        self._rows = self.host.numpy()
        self._pairs = self._rows[1:].reshape(capacity, 2)

    def fill(
        self, src_ids: Sequence[int], dst_ids: Sequence[int], num_src: int | None = None, num_dst: int | None = None
    ) -> int:
        """Write the ids into the host buffer (not yet to the device) and return their count;
        with `num_src` and `num_dst`, first refuse ids that check_pairs would."""
        n = len(src_ids)
        if n != len(dst_ids):
            raise ValueError(f"{n} source and {len(dst_ids)} destination blocks do not pair up")
        if n > self.capacity:
            raise ValueError(f"{n} blocks in one copy, more than this index's {self.capacity}")
        pairs = self._pairs[:n]
        pairs[:, 0] = src_ids
        pairs[:, 1] = dst_ids
        if num_src is not None and num_dst is not None:
            try:
                _check_ids(pairs[:, 0], pairs[:, 1], num_src, num_dst)
            except ValueError:
                self._rows[0] = 0  # nothing of a refused copy may run
                raise
        self._rows[0] = n
        return n

    def send(self, count: int | None = None) -> None:
        """Enqueue the copy of the host buffer's first `count` pairs (default: all) to the
        device on the current stream."""
        if self.on_device is not self.host:
            end = 1 + 2 * (self.capacity if count is None else count)
            self.on_device[:end].copy_(self.host[:end], non_blocking=True)

    def views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, source ids, destination ids) on the device, at fixed addresses."""
        return self.on_device[0:1], self.on_device[1::2], self.on_device[2::2]


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
    """dst[dst_ids[i]] = src[src_ids[i]] for uint8 tensors [num_blocks, block_len]. On CUDA
    it is enqueued on the current stream and returns before it ends; the source may sit on
    another GPU that the destination's reaches by peer access. (A one-off: repeated copies
    into one cache go through a BlockCopier, which reuses its buffers.)"""
    _check_rows(src, dst)
    if not len(src_ids):
        check_pairs(src_ids, dst_ids, src.shape[0], dst.shape[0])
        return
    index = BlockIndex(dst.device, len(src_ids))
    n = index.fill(src_ids, dst_ids, src.shape[0], dst.shape[0])
    _launch(src, dst, index, n)


def _launch(src: torch.Tensor, dst: torch.Tensor, index: BlockIndex, n: int) -> None:
    """The copy of `index`'s first `n` pairs, without a graph."""
    index.send(n)
    if dst.is_cuda and triton_available():
        launch_copy_kernel(src, dst, index, n)
    else:
        _, s, d = index.views()
        dst.index_copy_(0, d[:n], src.index_select(0, s[:n]))


def launch_copy_kernel(src: torch.Tensor, dst: torch.Tensor, index: BlockIndex, grid_pairs: int) -> None:
    """The Triton kernel over `index`'s device buffer, with programs for `grid_pairs` pairs
    (those past the index's count do nothing). Also runs in Triton's interpreter on CPU."""
    _check_rows(src, dst)
    geometry = plan_copy(src.shape[1], src.data_ptr(), dst.data_ptr())
    word = WORD_DTYPES[geometry.word_bytes]
    # on the destination's GPU; a source on another GPU is read by peer access
    with torch.cuda.device(dst.device) if dst.is_cuda else contextlib.nullcontext():
        _kernel()[(grid_pairs, geometry.chunks_per_block)](
            src.view(word),
            dst.view(word),
            index.on_device,
            geometry.words_per_block,
            CHUNK=geometry.chunk_words,
            num_warps=8 if geometry.chunk_words >= 2048 else 4,
        )


class BlockCopier:
    """Repeated copy_blocks into one cache, with the host's share of a copy cut to filling
    a pinned buffer and one launch: on CUDA with Triton (unless `graphs` is False) the
    index upload and the kernel launch are captured once per source cache, power-of-two
    bucket of block counts and buffer, as a CUDA graph, then replayed (a Triton launch
    from Python costs as long as moving tens of MiB). A ring of `slots` index buffers lets
    several copies be in flight at once: a buffer is refilled only after its last copy
    ended. Not thread-safe: one thread at a time (its user's lock)."""

    def __init__(
        self, dst: torch.Tensor, stream: torch.cuda.Stream | None = None, *, graphs: bool = True, slots: int = 4
    ) -> None:
        _check_rows(dst, dst)
        self.dst = dst
        self.stream = stream
        on_gpu = dst.is_cuda
        self.graphs = graphs and on_gpu and triton_available()
        self._slots = [BlockIndex(dst.device, dst.shape[0]) for _ in range(slots)]
        self._events = [torch.cuda.Event() if on_gpu else None for _ in range(slots)]
        self._used = [False] * slots
        self._next = 0
        self._graphs: dict[tuple[int, int, int, int], torch.cuda.CUDAGraph] = {}
        self._checked: set[tuple[int, int]] = set()  # sources whose layout was checked

    def copy(self, src: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]) -> torch.cuda.Event | None:
        """Enqueue dst[dst_ids] = src[src_ids] on `stream` (the current one if None) and
        return an event recorded after it (None when the copy already ended: on CPU, or
        no blocks)."""
        key = (src.data_ptr(), src.shape[0])
        if key not in self._checked:
            _check_rows(src, self.dst)
            self._checked.add(key)
        slot = self._next
        index, event = self._slots[slot], self._events[slot]
        if event is not None and self._used[slot]:
            event.synchronize()  # the buffer's last copy read it (at once unless `slots` are in flight)
        n = index.fill(src_ids, dst_ids, src.shape[0], self.dst.shape[0])
        if not n:
            return None
        self._next = (slot + 1) % len(self._slots)
        if event is None:
            _launch(src, self.dst, index, n)
            return None
        stream = self.stream or torch.cuda.current_stream(self.dst.device)
        with torch.cuda.stream(stream):
            if self.graphs:
                bucket = min(1 << (n - 1).bit_length(), index.capacity)
                graph = self._graphs.get((*key, bucket, slot))
                if graph is None:
                    graph = self._capture(src, index, bucket, (*key, bucket, slot))
                graph.replay()
            else:
                _launch(src, self.dst, index, n)
            event.record(stream)
        self._used[slot] = True
        return event

    def forget(self, src: torch.Tensor) -> None:
        """Drop the graphs that read `src` (before its memory goes away)."""
        ptr = src.data_ptr()
        for key in [k for k in self._graphs if k[0] == ptr]:
            del self._graphs[key]
        self._checked = {k for k in self._checked if k[0] != ptr}

    def _capture(self, src: torch.Tensor, index: BlockIndex, bucket: int, key) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.current_stream(self.dst.device)
        index.send(bucket)
        launch_copy_kernel(src, self.dst, index, bucket)  # compiles outside the capture
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread-local: the worker's own CUDA work in other threads goes on meanwhile
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            index.send(bucket)
            launch_copy_kernel(src, self.dst, index, bucket)
        finally:
            graph.capture_end()
        self._graphs[key] = graph
        return graph


class GraphedBlockCopy(BlockCopier):
    """A BlockCopier with CUDA graphs on `stream` (the name the GPU tests know)."""

    def __init__(self, dst: torch.Tensor, stream: torch.cuda.Stream) -> None:
        super().__init__(dst, stream, graphs=True)


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


def _copy_blocks_kernel(src_ptr, dst_ptr, index_ptr, words_per_block, CHUNK: tl.constexpr):
    # index_ptr: [count, src0, dst0, src1, dst1, ..] (BlockIndex)
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    if pair >= tl.load(index_ptr):  # a graph's bucket may hold more programs than pairs
        return
    src_block = tl.load(index_ptr + 1 + 2 * pair)  # int64, so the row offsets below are 64-bit
    dst_block = tl.load(index_ptr + 2 + 2 * pair)
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
