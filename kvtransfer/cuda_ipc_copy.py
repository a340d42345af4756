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
    asynchronous copy of a fixed buffer (which a CUDA graph can also replay). One user
    at a time, who waits for each copy before the next."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        on_gpu = device.type == "cuda"
        self.host = torch.zeros(1 + 2 * capacity, dtype=torch.int64, pin_memory=on_gpu)
        self.on_device = torch.zeros_like(self.host, device=device) if on_gpu else self.host
        self._rows = self.host.numpy()

    def fill(self, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
        """Write the ids into the host buffer (not yet to the device)."""
        n = len(src_ids)
        if n > self.capacity:
            raise ValueError(f"{n} blocks in one copy, more than this index's {self.capacity}")
        self._rows[0] = n
        self._rows[1 : 1 + n] = src_ids
        self._rows[1 + self.capacity : 1 + self.capacity + n] = dst_ids

    def send(self) -> None:
        """Enqueue the host buffer's copy to the device on the current stream."""
        if self.on_device is not self.host:
            self.on_device.copy_(self.host, non_blocking=True)

    def views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count, source ids, destination ids) on the device, at fixed addresses."""
        c = self.capacity
        return self.on_device[0:1], self.on_device[1 : 1 + c], self.on_device[1 + c :]


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


def launch_copy_kernel(src: torch.Tensor, dst: torch.Tensor, index: BlockIndex, grid_pairs: int) -> None:
    """The Triton kernel over `index`'s device buffers, with programs for `grid_pairs` pairs
    (those past the index's count do nothing). Also runs in Triton's interpreter on CPU."""
    _check_rows(src, dst)
    geometry = plan_copy(src.shape[1], src.data_ptr(), dst.data_ptr())
    word = WORD_DTYPES[geometry.word_bytes]
    count, src_idx, dst_idx = index.views()
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
            num_warps=8 if geometry.chunk_words >= 2048 else 4,
        )


class GraphedBlockCopy:
    """copy_blocks into one CUDA cache with the host's share cut to a buffer fill and a
    graph replay: per source cache and power-of-two bucket of block counts, the index
    upload and the kernel launch are captured once as a CUDA graph, then replayed (a
    Triton launch from Python costs as long as moving tens of MiB). Used from one
    thread, which waits for each copy before the next."""

    def __init__(self, dst: torch.Tensor, stream: torch.cuda.Stream) -> None:
        self.dst = dst
        self.stream = stream
        self.index = BlockIndex(dst.device, dst.shape[0])
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def copy(self, src: torch.Tensor, src_ids: Sequence[int], dst_ids: Sequence[int]) -> None:
        """Enqueue the copy on `stream`; the caller waits for it (an event) before the next."""
        _check_rows(src, self.dst)
        check_pairs(src_ids, dst_ids, src.shape[0], self.dst.shape[0])
        if not src_ids:
            return
        bucket = min(1 << (len(src_ids) - 1).bit_length(), self.index.capacity)
        self.index.fill(src_ids, dst_ids)
        graph = self._graphs.get((src.data_ptr(), bucket))
        if graph is None:
            graph = self._capture(src, bucket)
        graph.replay()

    def forget(self, src: torch.Tensor) -> None:
        """Drop the graphs that read `src` (before its memory goes away)."""
        for key in [k for k in self._graphs if k[0] == src.data_ptr()]:
            del self._graphs[key]

    def _capture(self, src: torch.Tensor, bucket: int) -> torch.cuda.CUDAGraph:
        with torch.cuda.stream(self.stream):
            self.index.send()
            launch_copy_kernel(src, self.dst, self.index, bucket)  # compiles outside the capture
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread-local: the worker's own CUDA work in other threads goes on meanwhile
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.index.send()
                launch_copy_kernel(src, self.dst, self.index, bucket)
            finally:
                graph.capture_end()
        self._graphs[(src.data_ptr(), bucket)] = graph
        return graph


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
