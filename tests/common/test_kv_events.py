"""KV events on the wire: vLLM's msgpack layout, both event encodings, and strict reading."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
)
from tests.common import vllm_kv_events as vllm


def _sample_batch(rank: int | None) -> KVEventBatch:
    return KVEventBatch(
        ts=1712345678.25,
        events=[
            BlockStored(
                block_hashes=[2**64 - 1, 7],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4, 5, 6, 7, 8],
                block_size=4,
                medium="GPU",
            ),
            BlockStored(
                block_hashes=[b"\x01" * 32],
                parent_block_hash=7,
                token_ids=[9, 10, 11, 12],
                block_size=4,
                lora_id=3,
                medium="CPU",
                lora_name="adapter",
                extra_keys=[["salt"]],
                group_idx=0,
            ),
            BlockRemoved(block_hashes=[7, 2**64 - 1], medium="GPU"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=rank,
    )


@pytest.mark.parametrize("rank", [None, 0, 3])
def test_a_batch_survives_encode_and_decode(rank):
    batch = _sample_batch(rank)
    assert decode_batch(encode_batch(batch)) == batch


def test_the_batch_is_an_array_with_the_rank_left_out_when_none():
    assert len(msgpack.unpackb(encode_batch(_sample_batch(None)))) == 2
    ts, events, rank = msgpack.unpackb(encode_batch(_sample_batch(2)))
    assert (ts, rank, len(events)) == (1712345678.25, 2, 4)


def test_events_are_maps_tagged_by_type_with_every_field_vllm_requires_present():
    _, events = msgpack.unpackb(encode_batch(_sample_batch(None)))
    assert events[0] == {
        "type": "BlockStored",
        "block_hashes": [2**64 - 1, 7],
        "parent_block_hash": None,
        "token_ids": [1, 2, 3, 4, 5, 6, 7, 8],
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }
    assert events[1]["lora_name"] == "adapter" and events[1]["group_idx"] == 0
    assert events[1]["block_hashes"] == [b"\x01" * 32]
    assert events[2] == {"type": "BlockRemoved", "block_hashes": [7, 2**64 - 1], "medium": "GPU"}
    assert events[3] == {"type": "AllBlocksCleared"}


def test_vllms_decoder_reads_every_event_we_write_even_with_every_optional_field_none():
    batch = KVEventBatch(
        ts=3.5,
        events=[
            BlockStored([1], None, [5, 6], 2),
            BlockRemoved([1]),
            AllBlocksCleared(),
            *_sample_batch(None).events,
        ],
    )
    decoded = vllm.decode(encode_batch(batch))
    first, removed = decoded.events[0], decoded.events[1]
    assert (first.block_hashes, first.parent_block_hash, first.lora_id, first.medium, first.lora_name) == (
        [1], None, None, None, None,
    )  # fmt: skip
    assert (removed.block_hashes, removed.medium) == ([1], None)
    assert isinstance(decoded.events[2], vllm.AllBlocksCleared)
    salted = decoded.events[4]
    assert (salted.lora_name, salted.extra_keys, salted.group_idx) == ("adapter", [["salt"]], 0)
    assert salted.block_hashes == [b"\x01" * 32]


def test_an_event_without_a_field_vllm_requires_is_what_vllms_decoder_refuses():
    # the check above can fail: this is the payload pdserve used to write
    payload = msgpack.packb(
        [1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                "token_ids": [1], "block_size": 1, "lora_id": None, "medium": "GPU"}]]
    )  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match="lora_name"):
        vllm.decode(payload)


def test_we_read_what_vllm_writes_bytes_hashes_and_every_optional_field_included():
    stored = vllm.BlockStored(
        block_hashes=[b"\xaa" * 32, b"\xbb" * 32],
        parent_block_hash=b"\xcc" * 32,
        token_ids=[1, 2, 3, 4],
        block_size=2,
        lora_id=7,
        medium="CPU",
        lora_name="adapter",
        extra_keys=[["adapter", "salt", ["img-0", 3]], ["adapter"]],
        group_idx=1,
        kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=4096,
        locality="REMOTE",
        ownership="shared",
        session_id="session-1",
        lookahead_token_ids=[[5, 6], [7]],
    )
    removed = vllm.BlockRemoved(block_hashes=[b"\xaa" * 32], medium="CPU", group_idx=1, locality="LOCAL",
                                ownership="owned")  # fmt: skip
    payload = vllm.encode(vllm.KVEventBatch(ts=9.0, events=[stored, removed, vllm.AllBlocksCleared()],
                                            data_parallel_rank=2))  # fmt: skip
    assert decode_batch(payload) == KVEventBatch(
        ts=9.0,
        events=[
            BlockStored(
                [b"\xaa" * 32, b"\xbb" * 32], b"\xcc" * 32, [1, 2, 3, 4], 2, 7, "CPU", "adapter",
                extra_keys=[["adapter", "salt", ["img-0", 3]], ["adapter"]], group_idx=1,
                kv_cache_spec_kind="sliding_window", kv_cache_spec_sliding_window=4096, locality="REMOTE",
                ownership="shared", session_id="session-1", lookahead_token_ids=[[5, 6], [7]],
            ),
            BlockRemoved([b"\xaa" * 32], "CPU", group_idx=1, locality="LOCAL", ownership="owned"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=2,
    )  # fmt: skip
    # and what vLLM leaves out (defaults, a null rank written as null) reads as None
    minimal = vllm.encode(vllm.KVEventBatch(ts=1.0, events=[
        vllm.BlockStored(block_hashes=[3], parent_block_hash=None, token_ids=[1], block_size=1,
                         lora_id=None, medium=None, lora_name=None)]))  # fmt: skip
    assert decode_batch(minimal) == KVEventBatch(ts=1.0, events=[BlockStored([3], None, [1], 1)])


def test_our_events_survive_a_round_trip_through_vllms_structs():
    batch = _sample_batch(4)
    batch.events.append(
        BlockStored([5], 4, [1, 2, 3, 4], 4, locality="LOCAL", session_id="s", lookahead_token_ids=[[1]])
    )
    assert decode_batch(vllm.encode(vllm.decode(encode_batch(batch)))) == batch


def test_the_older_array_tagged_event_form_is_read():
    payload = msgpack.packb(
        [
            5.0,
            [
                ["BlockStored", [11, 12], 10, [1, 2, 3, 4], 2, None, "GPU"],
                ["BlockStored", [13], None, [5, 6], 2],  # trailing defaults omitted
                ["BlockRemoved", [11], "GPU", None, "a field from a newer writer"],
                ["AllBlocksCleared"],
            ],
        ]
    )
    batch = decode_batch(payload)
    assert batch == KVEventBatch(
        ts=5.0,
        events=[
            BlockStored([11, 12], 10, [1, 2, 3, 4], 2, None, "GPU"),
            BlockStored([13], None, [5, 6], 2),
            BlockRemoved([11], "GPU"),
            AllBlocksCleared(),
        ],
    )


def test_map_events_may_omit_defaults_and_carry_unknown_fields():
    payload = msgpack.packb(
        [1, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [4], "block_size": 1, "new": 1}]]
    )
    assert decode_batch(payload).events == [BlockStored([1], None, [4], 1)]


def _bad(body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _stored_map(**fields) -> dict:
    return {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 1, **fields}


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\xc1", "not valid msgpack"),
        (b"\x92\x01", "not valid msgpack"),  # truncated
        (_bad({"ts": 1}), "must be an array"),
        (_bad([1.0]), "must be an array"),
        (_bad([1.0, [], 0, 1]), "must be an array"),
        (_bad(["now", []]), "ts must be"),
        (_bad([float("nan"), []]), "ts must be"),
        (_bad([1.0, {}]), "events must be an array"),
        (_bad([1.0, [], "rank"]), "data_parallel_rank"),
        (_bad([1.0, [{"type": "BlockMoved"}]]), "unknown event type"),
        (_bad([1.0, [{"block_hashes": [1]}]]), "unknown event type"),
        (_bad([1.0, [["Nope", 1]]]), "unknown event type"),
        (_bad([1.0, [[]]]), "tagged"),
        (_bad([1.0, [7]]), "tagged"),
        (_bad([1.0, [{"type": "BlockStored", "block_hashes": [1], "block_size": 1}]]), "lacks token_ids"),
        (_bad([1.0, [["BlockStored", [1], None]]]), "lacks token_ids"),
        (_bad([1.0, [{"type": "BlockRemoved", "block_hashes": [1.5]}]]), "int or bytes"),
        (_bad([1.0, [{"type": "BlockRemoved", "block_hashes": [True]}]]), "int or bytes"),
        (_bad([1.0, [{"type": "BlockRemoved", "block_hashes": 1}]]), "list of block hashes"),
        (_bad([1.0, [["BlockStored", [1], None, [1, "2"], 2]]]), "token_ids"),
        (_bad([1.0, [["BlockStored", [1], None, [1], 0]]]), "block_size"),
        (_bad([1.0, [["BlockStored", [1], "p", [1], 1]]]), "parent_block_hash"),
        (_bad([1.0, [["BlockStored", [1], None, [1], 1, None, 5]]]), "medium"),
        (_bad([1.0, [["BlockRemoved", [1], None, "0"]]]), "group_idx"),
        (_bad([1.0, [["BlockStored", [1], None, [1], 1, None, None, None, ["salt"]]]]), "extra_keys"),
        (_bad([1.0, [["BlockStored", [1], None, [1], 1, None, None, 5]]]), "lora_name"),
        (_bad([1.0, [_stored_map(locality=1)]]), "locality"),
        (_bad([1.0, [_stored_map(kv_cache_spec_sliding_window="4k")]]), "sliding_window"),
        (_bad([1.0, [_stored_map(lookahead_token_ids=[1, 2])]]), "lookahead_token_ids"),
        (_bad([1.0, [_stored_map(extra_keys="salt")]]), "extra_keys"),
        (_bad([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "ownership": []}]]), "ownership"),
    ],
)
def test_malformed_payloads_are_value_errors_that_say_what_is_wrong(payload, message):
    with pytest.raises(ValueError, match=message):
        decode_batch(payload)


def test_a_payload_that_is_not_bytes_is_refused():
    with pytest.raises(ValueError, match="must be bytes"):
        decode_batch("[1, []]")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_value_error(payload):
    try:
        assert isinstance(decode_batch(payload), KVEventBatch)
    except ValueError:
        pass


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=8)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type"]),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(
            st.text(max_size=12)
            | st.sampled_from(
                ["type", "block_hashes", "token_ids", "block_size", "parent_block_hash", "medium"]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_msgpack_values, _msgpack_values)
def test_random_structures_decode_or_raise_value_error(ts, events):
    for body in ([ts, events], [1.0, events], [1.0, [events]], [1.0, [events, events], ts]):
        try:
            batch = decode_batch(msgpack.packb(body, use_bin_type=True))
        except ValueError:
            continue
        assert decode_batch(encode_batch(batch)) == batch
