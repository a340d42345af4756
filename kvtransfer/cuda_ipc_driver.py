"""CUDA IPC through the driver library (libcuda.so.1, present wherever the NVIDIA driver
is), called with ctypes: export a device allocation as a 64-byte handle, map a peer's
handle into this process, unmap it.

Every call runs in the device's primary context, the one torch uses, pushed onto the
calling thread for its duration, so the connector's I/O thread may call these without
having touched CUDA before. Nothing here goes near pickle: a handle is plain bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from kvtransfer.connector import ConnectorUnavailableError
from kvtransfer.cuda_ipc_export import HANDLE_BYTES

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class CudaIpcError(RuntimeError):
    """A CUDA driver call failed; the text names the call and the driver's error."""


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * HANDLE_BYTES)]


def handle_bytes(handle: _IpcHandle) -> bytes:
    """All 64 bytes of a handle (its char array's .value would stop at the first NUL)."""
    return bytes(handle)


def handle_struct(data: bytes) -> _IpcHandle:
    if len(data) != HANDLE_BYTES:
        raise CudaIpcError(f"a CUDA IPC handle has {HANDLE_BYTES} bytes, got {len(data)}")
    return _IpcHandle.from_buffer_copy(data)


@dataclass(frozen=True)
class ExportedAllocation:
    handle: bytes  # HANDLE_BYTES bytes
    offset: int  # from the allocation's start to the exported pointer
    size: int  # of the whole allocation


@dataclass(frozen=True)
class MappedAllocation:
    base: int  # where the peer's allocation starts in this process
    size: int
    device: int  # the ordinal whose context mapped it


class CudaDriver:
    def __init__(self, library: str = "libcuda.so.1") -> None:
        try:
            self._lib = ctypes.CDLL(library)
        except OSError as e:
            raise ConnectorUnavailableError(
                f"CUDA IPC needs the NVIDIA driver library {library} ({e}); use TcpConnector or "
                "NixlConnector on machines without a GPU driver"
            ) from None
        u64, c_int, c_uint = ctypes.c_uint64, ctypes.c_int, ctypes.c_uint
        p = ctypes.POINTER
        self._declare("cuInit", [c_uint])
        self._declare("cuDeviceGet", [p(c_int), c_int])
        self._declare("cuDevicePrimaryCtxRetain", [p(ctypes.c_void_p), c_int])
        self._declare("cuDevicePrimaryCtxRelease_v2", [c_int])
        self._declare("cuCtxPushCurrent_v2", [ctypes.c_void_p])
        self._declare("cuCtxPopCurrent_v2", [p(ctypes.c_void_p)])
        self._declare("cuMemGetAddressRange_v2", [p(u64), p(ctypes.c_size_t), u64])
        self._declare("cuIpcGetMemHandle", [p(_IpcHandle), u64])
        self._declare("cuIpcOpenMemHandle_v2", [p(u64), _IpcHandle, c_uint])
        self._declare("cuIpcCloseMemHandle", [u64])
        self._lib.cuGetErrorName.argtypes = [c_int, p(ctypes.c_char_p)]
        self._lib.cuGetErrorName.restype = c_int
        self._call("cuInit", 0)

    def export(self, pointer: int, device: int) -> ExportedAllocation:
        """The IPC handle of the allocation that holds `pointer`, and where `pointer` sits
        in it (torch's caching allocator may place a tensor inside a larger allocation)."""
        with self._context(device):
            base, size = self._address_range(pointer)
            handle = _IpcHandle()
            self._call("cuIpcGetMemHandle", ctypes.byref(handle), pointer)
        return ExportedAllocation(handle_bytes(handle), pointer - base, size)

    def open(self, handle: bytes, device: int) -> MappedAllocation:
        """Map a peer process's allocation into this one, in `device`'s context (the peer's
        memory may sit on another GPU that this one reaches by peer access)."""
        raw = handle_struct(handle)
        mapped = ctypes.c_uint64()
        with self._context(device):
            self._call("cuIpcOpenMemHandle_v2", ctypes.byref(mapped), raw, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
            try:
                base, size = self._address_range(mapped.value)
            except CudaIpcError:
                self._call("cuIpcCloseMemHandle", mapped.value)
                raise
        return MappedAllocation(base, size, device)

    def close(self, mapping: MappedAllocation) -> None:
        with self._context(mapping.device):
            self._call("cuIpcCloseMemHandle", mapping.base)

    # -- plumbing ---------------------------------------------------------------------

    def _declare(self, name: str, argtypes: list) -> None:
        function = getattr(self._lib, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int

    def _call(self, name: str, *args) -> None:
        status = getattr(self._lib, name)(*args)
        if status != 0:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorName(status, ctypes.byref(text))
            error = text.value.decode() if text.value else f"error {status}"
            raise CudaIpcError(f"{name} failed: {error}")

    def _address_range(self, pointer: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._call("cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(size), pointer)
        return base.value, size.value

    @contextlib.contextmanager
    def _context(self, device: int) -> Iterator[None]:
        ordinal, context = ctypes.c_int(), ctypes.c_void_p()
        self._call("cuDeviceGet", ctypes.byref(ordinal), device)
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(context), ordinal)
        try:
            self._call("cuCtxPushCurrent_v2", context)
            try:
                yield
            finally:
                self._call("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))
        finally:
            self._call("cuDevicePrimaryCtxRelease_v2", ordinal)


@functools.cache
def cuda_driver() -> CudaDriver:
    """The process's driver binding, loaded on first use."""
    return CudaDriver()


class DeviceBytes:
    """A raw device range as a CUDA array (`__cuda_array_interface__`), so that
    torch.as_tensor views it as a uint8 tensor without copying. The tensor keeps this
    object, and through `owner` the mapping, alive."""

    def __init__(self, pointer: int, num_bytes: int, owner: object = None) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
            "strides": None,
            "stream": None,  # the consumer orders its own copies
        }
