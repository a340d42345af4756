"""The compatibility hash: equal for equal caches, different when any field differs."""

from __future__ import annotations

import dataclasses

import pytest

from kvtransfer.kv_cache_spec import KVCacheSpec

SPEC = KVCacheSpec(
    "SmolLM2-135M-Instruct", "bfloat16", num_kv_heads=3, head_size=64, num_layers=30, block_size=16
)


def test_equal_specs_hash_alike_and_torch_dtype_spellings_are_one_dtype():
    same = KVCacheSpec("SmolLM2-135M-Instruct", "torch.bfloat16", 3, 64, 30, 16, cache_dtype="auto")
    assert same == SPEC and same.compat_hash() == SPEC.compat_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"dtype": "float16"},
        {"num_kv_heads": 4},
        {"head_size": 128},
        {"num_layers": 29},
        {"block_size": 32},
        {"cache_dtype": "fp8"},
    ],
)
def test_any_differing_field_changes_the_hash_and_is_named(change):
    other = dataclasses.replace(SPEC, **change)
    assert other.compat_hash() != SPEC.compat_hash()
    (difference,) = SPEC.differences(other)
    assert difference.startswith(f"{next(iter(change))}:")


def test_a_spec_from_a_peer_must_be_complete_and_well_typed():
    assert KVCacheSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(ValueError, match="lacks block_size"):
        KVCacheSpec.from_dict({k: v for k, v in SPEC.to_dict().items() if k != "block_size"})
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        KVCacheSpec.from_dict({**SPEC.to_dict(), "num_layers": "30"})
    with pytest.raises(ValueError, match="must be a map"):
        KVCacheSpec.from_dict([1, 2])


def test_the_spec_gives_the_kv_cache_layout():
    assert SPEC.kv_cache_shape(10) == (10, 30, 2, 3, 16, 64)
