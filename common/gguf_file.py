"""Reading a GGUF file (format versions 2 and 3): its metadata as Python values and its
tensors as numpy views of the memory-mapped file.

The model config, the weights and the tokenizer all start from this file, so opening it is
on the path of every start. The metadata is walked once with `struct` over one memory map,
and a value is decoded when first read: a process that needs the config only never builds
the vocabulary's 49k strings. (The `gguf` package's GGUFReader makes a numpy view of every
part of every value instead, a quarter of a million for SmolLM2's vocabulary and merges,
and takes seconds; the tests hold this reader to its results.)

Torch-free, so a process that only tokenizes text never loads torch.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_MAX_DIMS = 4

_STRING = GGUFValueType.STRING.value
_ARRAY = GGUFValueType.ARRAY.value
# struct codes of the fixed-size value types; GGUF's bool is one byte, 0 or 1.
_SCALAR_CODES = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
# Tensor types whose elements numpy holds as they are; every other type is blocks of
# bytes, given as uint8 rows, as GGUFReader and gguf.quants.dequantize have them.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F16: "f2",
    GGMLQuantizationType.F32: "f4",
    GGMLQuantizationType.F64: "f8",
    GGMLQuantizationType.I8: "i1",
    GGMLQuantizationType.I16: "i2",
    GGMLQuantizationType.I32: "i4",
    GGMLQuantizationType.I64: "i8",
}


@dataclass(frozen=True, eq=False)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64, GGUF's order: the innermost dimension first, as GGUFReader gives it
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    # Read-only view of the mapped file: dims reversed, in the element dtype, or for block
    # types uint8 rows [..., bytes a row].
    data: np.ndarray


class GGUFFile:
    """A GGUF file, mapped. `metadata` maps each key to its value (int, float, bool, str,
    or a list of them, nested for arrays of arrays); `tensors` lists the tensors in file
    order. The tensors' data stays in the mapping, which lives as long as they do."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < _HEADER_BYTES:
                raise self._error(f"it has {size} bytes, fewer than a GGUF header's {_HEADER_BYTES}")
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map[:4] != MAGIC:
            raise self._error(f"it begins with {self._map[:4]!r}, not {MAGIC!r}")
        # A file written on a big-endian machine says so by its version's byte order.
        (version,) = struct.unpack_from("<I", self._map, 4)
        order = ">" if version & 0xFFFF == 0 else "<"
        self.byte_order = order
        self._u32 = struct.Struct(order + "I").unpack_from
        self._u64 = struct.Struct(order + "Q").unpack_from
        self._scalars = {int(t): struct.Struct(order + code) for t, code in _SCALAR_CODES.items()}
        self._dtypes = {int(t): np.dtype(order + code) for t, code in _SCALAR_CODES.items()}
        self.version, tensor_count, kv_count = struct.unpack_from(order + "IQQ", self._map, 4)
        if self.version not in VERSIONS:
            raise self._error(f"it is GGUF version {self.version}; pdserve reads versions 2 and 3")
        try:
            fields, offset = self._walk_metadata(_HEADER_BYTES, kv_count)
            self.metadata = GGUFMetadata(fields, self._value, self.path)
            infos, offset = self._read_tensor_infos(offset, tensor_count)
        except (struct.error, UnicodeDecodeError) as exc:
            raise self._error(f"its header does not parse ({exc}); it is truncated or corrupt") from None
        self.alignment = self._alignment(fields)
        self.data_offset = offset + -offset % self.alignment
        self.tensors = [self._tensor(*info) for info in infos]

    def _error(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is not a readable GGUF file: {what}")

    def _walk_metadata(self, offset: int, count: int) -> tuple[dict[str, tuple[int, int]], int]:
        """Key → (value type, offset of the value) for `count` keys from `offset`, and the
        offset after the last value; the values are only stepped over."""
        fields: dict[str, tuple[int, int]] = {}
        m, u32, u64, size = self._map, self._u32, self._u64, len(self._map)
        for _ in range(count):
            (n,) = u64(m, offset)
            key = str(m[offset + 8 : offset + 8 + n], "utf-8")
            offset += 8 + n
            (value_type,) = u32(m, offset)
            if key in fields:
                raise self._error(f"metadata key {key!r} appears twice")
            fields[key] = (value_type, offset + 4)
            offset = self._skip(key, value_type, offset + 4)
            if offset > size:
                raise self._error(
                    f"metadata {key!r} runs past the end of the file ({size} bytes); it is truncated or corrupt"
                )
        return fields, offset

    def _skip(self, key: str, value_type: int, offset: int) -> int:
        """The offset after the value of `value_type` at `offset`."""
        scalar = self._scalars.get(value_type)
        if scalar is not None:
            return offset + scalar.size
        m, u64 = self._map, self._u64
        if value_type == _STRING:
            return offset + 8 + u64(m, offset)[0]
        if value_type != _ARRAY:
            raise self._error(f"metadata {key!r} has value type {value_type}, which GGUF does not define")
        (item_type,) = self._u32(m, offset)
        (count,) = u64(m, offset + 4)
        offset += 12
        item = self._scalars.get(item_type)
        if item is not None:
            return offset + count * item.size
        if item_type == _STRING:
            for _ in range(count):
                offset += 8 + u64(m, offset)[0]
            return offset
        for _ in range(count):
            offset = self._skip(key, item_type, offset)
        return offset

    def _value(self, value_type: int, offset: int) -> tuple[Any, int]:
        """The value of `value_type` at `offset` (walked already, so known to be whole and
        well typed), and the offset after it."""
        m, u64 = self._map, self._u64
        scalar = self._scalars.get(value_type)
        if scalar is not None:
            return scalar.unpack_from(m, offset)[0], offset + scalar.size
        if value_type == _STRING:
            (n,) = u64(m, offset)
            return str(m[offset + 8 : offset + 8 + n], "utf-8"), offset + 8 + n
        (item_type,) = self._u32(m, offset)
        (count,) = u64(m, offset + 4)
        offset += 12
        dtype = self._dtypes.get(item_type)
        if dtype is not None:
            end = offset + count * dtype.itemsize
            return (np.frombuffer(m, dtype, count, offset).tolist() if count else []), end
        items: list[Any] = []
        if item_type == _STRING:
            append = items.append
            for _ in range(count):
                (n,) = u64(m, offset)
                offset += 8
                append(str(m[offset : offset + n], "utf-8"))
                offset += n
            return items, offset
        for _ in range(count):
            item, offset = self._value(item_type, offset)
            items.append(item)
        return items, offset

    def _read_tensor_infos(
        self, offset: int, count: int
    ) -> tuple[list[tuple[str, list[int], int, int]], int]:
        """(name, dims, type, offset in the data region) of each tensor, and the offset after them."""
        m, u32, u64 = self._map, self._u32, self._u64
        infos = []
        for _ in range(count):
            (n,) = u64(m, offset)
            name = str(m[offset + 8 : offset + 8 + n], "utf-8")
            offset += 8 + n
            (n_dims,) = u32(m, offset)
            if n_dims > _MAX_DIMS:
                raise self._error(f"tensor {name} has {n_dims} dimensions, more than GGML's {_MAX_DIMS}")
            dims = list(struct.unpack_from(f"{self.byte_order}{n_dims}Q", m, offset + 4))
            offset += 4 + 8 * n_dims
            (raw_type,) = u32(m, offset)
            (data_offset,) = u64(m, offset + 4)
            offset += 12
            infos.append((name, dims, raw_type, data_offset))
        names = [info[0] for info in infos]
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise self._error(f"tensor {twice[0]} appears twice")
        return infos, offset

    def _alignment(self, fields: Mapping[str, tuple[int, int]]) -> int:
        if "general.alignment" not in fields:
            return DEFAULT_ALIGNMENT
        if fields["general.alignment"][0] != GGUFValueType.UINT32:
            raise self._error("general.alignment is not a uint32")
        alignment = self.metadata["general.alignment"]
        if alignment <= 0 or alignment & (alignment - 1):
            raise self._error(f"general.alignment {alignment} is not a power of two")
        return alignment

    def _tensor(self, name: str, dims: list[int], raw_type: int, relative_offset: int) -> GGUFTensor:
        try:
            tensor_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise self._error(
                f"tensor {name} has type {raw_type}, which the gguf package does not know"
            ) from None
        block_size, block_bytes = GGML_QUANT_SIZES[tensor_type]
        n_elements = math.prod(dims)
        n_bytes = n_elements * block_bytes // block_size
        start = self.data_offset + relative_offset
        if start + n_bytes > len(self._map):
            raise self._error(
                f"tensor {name} ends at byte {start + n_bytes}, past the end of the file "
                f"({len(self._map)} bytes); the file is truncated"
            )
        shape = tuple(reversed(dims))
        element = _ELEMENT_DTYPES.get(tensor_type)
        if element is not None:
            data = np.frombuffer(self._map, np.dtype(self.byte_order + element), n_elements, start)
        else:
            if not dims or dims[0] % block_size:
                raise self._error(
                    f"tensor {name} of {tensor_type.name} has rows of {dims[0] if dims else 0} "
                    f"elements, not a multiple of its blocks of {block_size}"
                )
            data = np.frombuffer(self._map, np.uint8, n_bytes, start)
            shape = (*shape[:-1], dims[0] // block_size * block_bytes)
        return GGUFTensor(
            name=name,
            tensor_type=tensor_type,
            shape=np.array(dims, dtype=np.uint64),
            n_elements=n_elements,
            n_bytes=n_bytes,
            data_offset=start,
            data=data.reshape(shape),
        )


class GGUFMetadata(Mapping[str, Any]):
    """A GGUF file's metadata: key → value, decoded on first read and kept. A list value is
    shared by every reader of the key: copy it before changing it."""

    def __init__(
        self,
        fields: dict[str, tuple[int, int]],
        decode: Callable[[int, int], tuple[Any, int]],
        path: Path,
    ):
        self._fields = fields  # key → (value type, offset of the value)
        self._decode = decode  # (value type, offset) → (value, offset after it)
        self._path = path
        self._values: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        value_type, offset = self._fields[key]
        try:
            value = self._values[key] = self._decode(value_type, offset)[0]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self._path}: metadata {key!r} is not valid UTF-8 ({exc})") from None
        return value

    def __contains__(self, key: object) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """The GGUFFile of `path`, shared by everyone who reads it in this process (the config,
    the weights and the tokenizer), so the file is mapped and each value decoded once. A file
    written again (a new modification time) is read again."""
    path = os.path.abspath(path)
    return _open_gguf(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)
