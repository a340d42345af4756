"""common/gguf_file.py reads what the `gguf` package's GGUFReader reads: every metadata
value, every tensor's name, type, shape and bytes; and it names the file it cannot read."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType
from gguf.quants import quantize

from common.gguf_file import GGUFFile, open_gguf

KINDS = GGUFValueType
# key → (value, type, item type): one key of every value type, and arrays of each item kind.
VALUES = {
    "test.uint8": (200, KINDS.UINT8, None),
    "test.int8": (-100, KINDS.INT8, None),
    "test.uint16": (60000, KINDS.UINT16, None),
    "test.int16": (-30000, KINDS.INT16, None),
    "test.uint32": (4_000_000_000, KINDS.UINT32, None),
    "test.int32": (-2_000_000_000, KINDS.INT32, None),
    "test.uint64": (2**63 + 5, KINDS.UINT64, None),
    "test.int64": (-(2**62), KINDS.INT64, None),
    "test.float32": (0.1, KINDS.FLOAT32, None),
    "test.float64": (0.1, KINDS.FLOAT64, None),
    "test.bool_true": (True, KINDS.BOOL, None),
    "test.bool_false": (False, KINDS.BOOL, None),
    "test.string": ("héllo wörld 中文 😀", KINDS.STRING, None),
    "test.empty_string": ("", KINDS.STRING, None),
    "test.uint8s": ([0, 1, 255], KINDS.ARRAY, KINDS.UINT8),
    "test.int16s": ([-5, 7], KINDS.ARRAY, KINDS.INT16),
    "test.int32s": ([3, -3, 2**31 - 1], KINDS.ARRAY, KINDS.INT32),
    "test.uint64s": ([2**64 - 1, 0], KINDS.ARRAY, KINDS.UINT64),
    "test.int64s": ([-(2**63), 2**63 - 1], KINDS.ARRAY, KINDS.INT64),
    "test.float32s": ([0.5, -1.25, 1e-5], KINDS.ARRAY, KINDS.FLOAT32),
    "test.float64s": ([0.1, 1e300], KINDS.ARRAY, KINDS.FLOAT64),
    "test.bools": ([True, False, True], KINDS.ARRAY, KINDS.BOOL),
    "test.strings": (["a", "", "Ġ t", "<|im_end|>", "ü"], KINDS.ARRAY, KINDS.STRING),
}
NESTED = {"test.nested_ints": [[1, 2], [3]], "test.nested_strings": [["x", "yz"], ["w"]]}


def _tensors() -> dict[str, tuple[np.ndarray, GGMLQuantizationType | None]]:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((6, 64)).astype(np.float32)
    return {
        "f32.weight": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "f16.weight": (rng.standard_normal((2, 3, 4)).astype(np.float16), None),
        "i32.weight": (np.arange(7, dtype=np.int32), None),
        "q4_0.weight": (quantize(weights, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0),
        "q8_0.weight": (quantize(weights, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0),
    }


def write_gguf(path, endianess=GGUFEndian.LITTLE, alignment=None, extra=()) -> None:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, kind, item_kind) in VALUES.items():
        writer.add_key_value(key, value, kind, sub_type=item_kind)
    for key, value in NESTED.items():
        writer.add_array(key, value)
    for key, value, kind in extra:
        writer.add_key_value(key, value, kind)
    for name, (data, raw_dtype) in _tensors().items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def reference_metadata(reader: gguf.GGUFReader) -> dict:
    return {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}


def assert_same_value(ours, theirs, key):
    assert ours == theirs, key
    assert type(ours) is type(theirs), key  # True == 1, so the type is checked too
    if isinstance(ours, list):
        for a, b in zip(ours, theirs, strict=True):
            assert_same_value(a, b, key)


def assert_reads_as_gguf_reader(path) -> GGUFFile:
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.version == theirs.fields["GGUF.version"].contents()
    assert ours.alignment == theirs.alignment and ours.data_offset == theirs.data_offset
    expected = reference_metadata(theirs)
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        if key not in NESTED:  # GGUFReader flattens arrays of arrays
            assert_same_value(ours.metadata[key], value, key)
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == (
            b.name,
            b.tensor_type,
            b.n_elements,
            b.n_bytes,
            b.data_offset,
        )
        assert isinstance(a.tensor_type, GGMLQuantizationType)
        assert a.shape.dtype == np.uint64 and a.shape.tolist() == b.shape.tolist(), a.name
        assert (a.data.dtype, a.data.shape) == (b.data.dtype, b.data.shape), a.name
        assert np.array_equal(a.data, b.data), a.name
        assert not a.data.flags.writeable, a.name
    return ours


def test_the_embedded_model_reads_as_gguf_reader_reads_it(smollm2_source):
    file = assert_reads_as_gguf_reader(smollm2_source.path)
    assert len(file.metadata["tokenizer.ggml.tokens"]) == 49152
    assert file.tensors[0].tensor_type == GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=["little", "big"])
def test_every_value_type_and_tensor_type_reads_as_gguf_reader_reads_it(tmp_path, endianess):
    write_gguf(tmp_path / "all.gguf", endianess=endianess)
    file = assert_reads_as_gguf_reader(tmp_path / "all.gguf")
    for key, (value, _, _) in VALUES.items():
        if isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float)):
            continue  # stored as float32 where the type says so; checked against GGUFReader above
        assert_same_value(file.metadata[key], value, key)
    assert file.metadata["test.float64"] == 0.1
    tensors = {t.name: t for t in file.tensors}
    for name, (data, _) in _tensors().items():
        assert np.array_equal(tensors[name].data, data), name
    assert tensors["q4_0.weight"].shape.tolist() == [64, 6]
    assert tensors["q4_0.weight"].data.shape == (6, 64 // 32 * 18)


def test_arrays_of_arrays_read_as_nested_lists(tmp_path):
    write_gguf(tmp_path / "nested.gguf")
    file = GGUFFile(tmp_path / "nested.gguf")
    for key, value in NESTED.items():
        assert file.metadata[key] == value


def test_general_alignment_places_the_data(tmp_path):
    write_gguf(tmp_path / "aligned.gguf", alignment=256)
    file = assert_reads_as_gguf_reader(tmp_path / "aligned.gguf")
    assert file.alignment == 256 and file.data_offset % 256 == 0


def test_a_value_that_is_not_utf8_fails_only_when_read_naming_the_key(tmp_path):
    write_gguf(tmp_path / "bad_text.gguf", extra=[("test.bad_text", b"\xff\xfe", KINDS.STRING)])
    file = GGUFFile(tmp_path / "bad_text.gguf")
    assert file.metadata["test.string"] == VALUES["test.string"][0]
    with pytest.raises(ValueError, match=r"bad_text\.gguf: metadata 'test\.bad_text' is not valid UTF-8"):
        file.metadata["test.bad_text"]


def test_metadata_is_a_mapping_that_decodes_what_is_read(smollm2_source):
    file = GGUFFile(smollm2_source.path)
    assert "tokenizer.ggml.tokens" in file.metadata and "no.such.key" not in file.metadata
    assert file.metadata.get("no.such.key", 7) == 7
    assert file.metadata["tokenizer.ggml.tokens"] is file.metadata["tokenizer.ggml.tokens"]


@pytest.mark.parametrize(
    "cut, fault",
    [
        (0, "it has 0 bytes"),
        (10, "it has 10 bytes"),
        (200, ".*it is truncated or corrupt"),
        (-10, "tensor .* ends at byte .* the file is truncated"),
    ],
    ids=["empty", "in-header", "in-metadata", "in-tensor-data"],
)
def test_a_truncated_file_is_refused_naming_the_file(tmp_path, cut, fault):
    write_gguf(tmp_path / "whole.gguf")
    data = (tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(ValueError, match=rf"cut\.gguf is not a readable GGUF file: {fault}"):
        GGUFFile(tmp_path / "cut.gguf")


def test_a_file_that_is_not_gguf_is_refused_naming_the_file(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"fake\.gguf is not a readable GGUF file: it begins with b'PK"):
        GGUFFile(tmp_path / "fake.gguf")


def test_an_unknown_version_is_refused_naming_it(tmp_path):
    write_gguf(tmp_path / "v9.gguf")
    data = bytearray((tmp_path / "v9.gguf").read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    (tmp_path / "v9.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"v9\.gguf .* GGUF version 9; pdserve reads versions 2 and 3"):
        GGUFFile(tmp_path / "v9.gguf")


def test_open_gguf_shares_one_file_until_it_is_written_again(tmp_path):
    path = tmp_path / "shared.gguf"
    write_gguf(path)
    first = open_gguf(path)
    assert open_gguf(str(path)) is first
    write_gguf(path, alignment=64)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = open_gguf(path)
    assert again is not first and again.alignment == 64
