"""Block hashing: the chain, its canonical encodings, the seed, the salt and event hashes."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.block_hash import (
    DEFAULT_HASH_SEED,
    block_extra_keys,
    cbor_encode,
    cluster_hash_seed,
    event_hash,
    get_hash_fn,
    hash_block_tokens,
    hash_request_blocks,
    hash_seed,
    install_cluster_hash_seed,
    none_hash,
    published_extra_keys,
    require_shared_hash_seed,
    shared_hash_seed,
)
from tests.common.vllm_kv_events import reference_chain, reference_none_hash
from tests.harness.torch_free import assert_imports_without_torch

REPO_ROOT = Path(__file__).resolve().parents[2]
PARENT = bytes(range(32))
TOKENS = [1, 2, 300, 70000]


def _run_python(code: str, env_overrides: dict[str, str | None]) -> str:
    env = dict(os.environ)
    for key, value in env_overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


# The encodings written out byte by byte, independent of the code under test.
# msgpack: fixarray(3), bin8(32) parent, fixarray(4) [fixint 1, fixint 2, uint16 300,
# uint32 70000], nil.
MSGPACK_BYTES = b"\x93" + b"\xc4\x20" + PARENT + b"\x94\x01\x02\xcd\x01\x2c\xce\x00\x01\x11\x70" + b"\xc0"
# CBOR: array(3), bytes(32) parent, array(4) [1, 2, uint16 300, uint32 70000], null.
CBOR_BYTES = b"\x83" + b"\x58\x20" + PARENT + b"\x84\x01\x02\x19\x01\x2c\x1a\x00\x01\x11\x70" + b"\xf6"


def test_sha256_is_sha256_of_canonical_msgpack_of_the_triple():
    expected = hashlib.sha256(MSGPACK_BYTES).digest()
    assert hash_block_tokens(PARENT, TOKENS, None, "sha256") == expected


def test_sha256_cbor_is_sha256_of_canonical_cbor_of_the_triple():
    expected = hashlib.sha256(CBOR_BYTES).digest()
    assert hash_block_tokens(PARENT, TOKENS, None, "sha256_cbor") == expected


def test_extra_keys_are_encoded_as_an_array_in_the_third_slot():
    # array(1) [text(4) "salt"] in place of null
    cbor = CBOR_BYTES[:-1] + b"\x81\x64salt"
    assert hash_block_tokens(PARENT, TOKENS, ["salt"], "sha256_cbor") == hashlib.sha256(cbor).digest()
    msgpack_bytes = MSGPACK_BYTES[:-1] + b"\x91\xa4salt"
    assert hash_block_tokens(PARENT, TOKENS, ("salt",), "sha256") == hashlib.sha256(msgpack_bytes).digest()


def test_empty_extra_keys_hash_like_none():
    assert hash_block_tokens(PARENT, TOKENS, [], "sha256") == hash_block_tokens(
        PARENT, TOKENS, None, "sha256"
    )


@pytest.mark.parametrize(
    "value, encoded_hex",
    [  # RFC 8949, appendix A
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (100, "1864"),
        (1000, "1903e8"),
        (1000000, "1a000f4240"),
        (1000000000000, "1b000000e8d4a51000"),
        (18446744073709551615, "1bffffffffffffffff"),
        (18446744073709551616, "c249010000000000000000"),
        (-1, "20"),
        (-10, "29"),
        (-100, "3863"),
        (-1000, "3903e7"),
        (-18446744073709551617, "c349010000000000000000"),
        (False, "f4"),
        (True, "f5"),
        (None, "f6"),
        (b"", "40"),
        (b"\x01\x02\x03\x04", "4401020304"),
        ("", "60"),
        ("a", "6161"),
        ("IETF", "6449455446"),
        ("\u00fc", "62c3bc"),
        ([], "80"),
        ([1, [2, 3], [4, 5]], "8301820203820405"),
        (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ],
)
def test_cbor_encoder_matches_rfc8949_examples(value, encoded_hex):
    assert cbor_encode(value).hex() == encoded_hex


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_values_without_a_canonical_encoding_are_refused(algo):
    with pytest.raises(TypeError, match="canonical encoding"):
        hash_block_tokens(PARENT, TOKENS, [1.5], algo)
    with pytest.raises(TypeError, match="canonical encoding"):
        hash_block_tokens(PARENT, TOKENS, [{"a": 1}], algo)


def test_unknown_algo_names_the_choices():
    with pytest.raises(ValueError, match="sha256_cbor"):
        get_hash_fn("md5")


def test_xxhash_algos_hash_the_same_encodings_or_say_how_to_install():
    if importlib.util.find_spec("xxhash") is None:
        with pytest.raises(ValueError, match="pip install xxhash"):
            hash_block_tokens(PARENT, TOKENS, None, "xxhash")
        return
    import xxhash

    assert hash_block_tokens(PARENT, TOKENS, None, "xxhash") == xxhash.xxh3_128_digest(MSGPACK_BYTES)
    assert hash_block_tokens(PARENT, TOKENS, None, "xxhash_cbor") == xxhash.xxh3_128_digest(CBOR_BYTES)


def test_none_hash_is_the_hash_of_pythonhashseed_when_set():
    out = _run_python(
        "from common.block_hash import none_hash; print(none_hash('sha256_cbor').hex())",
        {"PYTHONHASHSEED": "1234"},
    )
    assert out == hashlib.sha256(b"\x64" + b"1234").hexdigest()  # text(4) "1234"


def test_none_hash_uses_the_fixed_seed_without_pythonhashseed():
    out = _run_python(
        "from common.block_hash import none_hash; print(none_hash('sha256').hex())",
        {"PYTHONHASHSEED": None},
    )
    assert DEFAULT_HASH_SEED == "vllm-none-hash"  # vLLM 0.33's, for sha256 and sha256_cbor
    seed = DEFAULT_HASH_SEED.encode()
    assert len(seed) < 32
    assert out == hashlib.sha256(bytes([0xA0 | len(seed)]) + seed).hexdigest()  # fixstr


def test_every_process_computes_the_same_chain():
    code = (
        "import json; from common.block_hash import hash_request_blocks as h; "
        "print(json.dumps([x.hex() for a in ('sha256', 'sha256_cbor') "
        "for x in h(list(range(100)), 16, a, cache_salt='s')]))"
    )
    first = json.loads(_run_python(code, {"PYTHONHASHSEED": None}))
    second = json.loads(_run_python(code, {"PYTHONHASHSEED": None}))
    assert first == second
    assert len(first) == 2 * 6
    here = [
        x.hex() for a in ("sha256", "sha256_cbor") for x in hash_request_blocks(list(range(100)), 16, a, "s")
    ]
    if not os.environ.get("PYTHONHASHSEED"):
        assert here == first
    other_seed = json.loads(_run_python(code, {"PYTHONHASHSEED": "7"}))
    assert set(other_seed).isdisjoint(first)


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_request_blocks_chain_full_blocks_from_none_hash(algo):
    tokens = list(range(10, 30))  # 20 tokens: 2 full blocks of 8, 4 left over
    hashes = hash_request_blocks(tokens, 8, algo)
    assert len(hashes) == 2
    first = hash_block_tokens(none_hash(algo), tokens[:8], None, algo)
    assert hashes == [first, hash_block_tokens(first, tokens[8:16], None, algo)]
    assert hash_block_tokens(None, tokens[:8], None, algo) == first


def test_a_longer_sequence_extends_the_chain_of_its_prefix():
    tokens = list(range(64))
    assert hash_request_blocks(tokens, 4)[:5] == hash_request_blocks(tokens[:22], 4)
    assert (
        hash_request_blocks(tokens[16:], 4, parent=hash_request_blocks(tokens[:16], 4)[-1])
        == (hash_request_blocks(tokens, 4)[4:])
    )


def test_changing_one_token_changes_its_block_and_every_later_one():
    tokens = list(range(32))
    changed = tokens.copy()
    changed[13] = 999
    a, b = hash_request_blocks(tokens, 4), hash_request_blocks(changed, 4)
    assert a[:3] == b[:3]
    assert all(x != y for x, y in zip(a[3:], b[3:], strict=True))


def test_cache_salt_is_an_extra_key_of_block_zero_only():
    tokens = list(range(12))
    salted = hash_request_blocks(tokens, 4, "sha256", cache_salt="tenant-a")
    plain = hash_request_blocks(tokens, 4, "sha256")
    assert all(s != p for s, p in zip(salted, plain, strict=True))  # from block 0 onward
    b0 = hash_block_tokens(None, tokens[:4], [("cache_salt", "tenant-a")])  # tagged, as vLLM 0.33
    b1 = hash_block_tokens(b0, tokens[4:8], None)
    b2 = hash_block_tokens(b1, tokens[8:12], None)
    assert salted == [b0, b1, b2]
    assert hash_request_blocks(tokens, 4, "sha256", cache_salt="tenant-b")[0] != b0


def test_a_continued_chain_ignores_the_salt():
    tokens = list(range(8))
    parent = hash_request_blocks(tokens[:4], 4, cache_salt="x")[0]
    assert (
        hash_request_blocks(tokens[4:], 4, cache_salt="x", parent=parent)
        == hash_request_blocks(tokens, 4, cache_salt="x")[1:]
    )


def test_event_hash_is_the_low_64_bits_big_endian_unsigned():
    digest = bytes.fromhex("ffeeddccbbaa9988" + "0102030405060708" + "00" * 15 + "05")
    assert event_hash(digest) == 5
    assert event_hash(bytes.fromhex("11" * 24 + "8000000000000001")) == 0x8000000000000001
    assert event_hash(hashlib.sha256(b"x").digest()) == int(hashlib.sha256(b"x").hexdigest()[-16:], 16)


def test_hashing_and_kv_events_import_without_torch():
    assert_imports_without_torch("common.block_hash", "common.kv_events")


# -- vLLM 0.33's chains, computed independently with cbor2 (tests/common/vllm_kv_events.py) --

_VECTOR_CODE = (
    "import json; from common.block_hash import hash_request_blocks as h; "
    "t = list(range(1000, 1040)); "
    "print(json.dumps([[x.hex() for x in h(t, 16, 'sha256_cbor', **kw)] for kw in "
    "({}, {'cache_salt': 'tenant-a'}, {'lora': ('sql', '/adapters/sql')}, "
    "{'cache_salt': 'tenant-a', 'lora': ('sql', '/adapters/sql')})]))"
)
_VECTOR_KWARGS = (
    {},
    {"cache_salt": "tenant-a"},
    {"lora": ("sql", "/adapters/sql")},
    {"cache_salt": "tenant-a", "lora": ("sql", "/adapters/sql")},
)


@pytest.mark.parametrize("seed", [None, "1234"], ids=["no-PYTHONHASHSEED", "PYTHONHASHSEED=1234"])
def test_sha256_cbor_chains_are_vllms_computed_with_cbor2(seed):
    ours = json.loads(_run_python(_VECTOR_CODE, {"PYTHONHASHSEED": seed}))
    tokens = list(range(1000, 1040))  # 2 full blocks of 16
    reference_seed = seed or "vllm-none-hash"
    expected = [[h.hex() for h in reference_chain(tokens, 16, reference_seed, **kw)] for kw in _VECTOR_KWARGS]
    assert ours == expected
    assert len({chain[0] for chain in ours}) == 4  # salt and LoRA each change block 0
    assert ours[1][1] != ours[0][1]  # and, through the chain, every later block


def test_sha256_cbor_none_hash_is_vllms():
    out = _run_python(
        "from common.block_hash import none_hash; print(none_hash('sha256_cbor').hex())",
        {"PYTHONHASHSEED": None},
    )
    assert out == reference_none_hash().hex()
    # a vector written out: sha256 of CBOR text(14) "vllm-none-hash"
    assert out == hashlib.sha256(b"\x6e" + b"vllm-none-hash").hexdigest()


def test_extra_keys_are_tagged_in_vllms_order_and_published_untagged():
    assert block_extra_keys(0) is None and block_extra_keys(3, cache_salt="s") is None
    assert block_extra_keys(0, cache_salt="s") == (("cache_salt", "s"),)
    assert block_extra_keys(0, "s", ("sql", "/a")) == (("lora", "sql", "/a"), ("cache_salt", "s"))
    assert block_extra_keys(5, "s", ("sql", "/a")) == (("lora", "sql", "/a"),)
    assert published_extra_keys(None) is None
    assert published_extra_keys((("lora", "sql", "/a"), ("mm", "img-0", 7), ("cache_salt", "s"))) == [
        "sql",
        ["img-0", 7],
        "s",
    ]


def test_a_continued_chain_keeps_the_lora_key_on_every_block():
    tokens = list(range(12))
    whole = hash_request_blocks(tokens, 4, "sha256_cbor", cache_salt="x", lora=("sql", "/a"))
    tail = hash_request_blocks(
        tokens[4:], 4, "sha256_cbor", cache_salt="x", parent=whole[0], lora=("sql", "/a")
    )
    assert tail == whole[1:]
    assert tail != hash_request_blocks(tokens[4:], 4, "sha256_cbor", parent=whole[0])


# -- the seed rule --------------------------------------------------------------------------


@pytest.fixture
def no_shared_seed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    install_cluster_hash_seed(None)
    yield
    install_cluster_hash_seed(None)


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_cryptographic_algos_always_have_a_shared_seed(no_shared_seed, algo):
    assert shared_hash_seed(algo) == "vllm-none-hash"
    assert shared_hash_seed(algo, cluster_secret=b"k" * 32) == "vllm-none-hash"  # vLLM's, not ours
    require_shared_hash_seed(algo, None, "router")


@pytest.mark.parametrize("algo", ["xxhash", "xxhash_cbor"])
def test_xxhash_without_a_shared_seed_is_refused_saying_why_and_what_to_set(no_shared_seed, algo):
    assert shared_hash_seed(algo) is None
    with pytest.raises(ValueError) as refused:
        require_shared_hash_seed(algo, None, "router")
    message = str(refused.value)
    assert f"--prefix-caching-hash-algo {algo}" in message
    assert "recompute the workers' block hashes" in message
    assert "PYTHONHASHSEED" in message and "--cluster-secret-file" in message


def test_xxhash_is_seeded_from_the_cluster_secret_through_an_hmac(no_shared_seed):
    secret = b"a cluster secret of some length"
    require_shared_hash_seed("xxhash", secret, "worker")
    derived = shared_hash_seed("xxhash", secret)
    assert derived == hmac.new(secret, b"pdserve NONE_HASH seed v1", hashlib.sha256).hexdigest()
    assert secret.hex() not in derived and derived == cluster_hash_seed(secret)
    install_cluster_hash_seed(secret)  # what a worker or router does at startup
    assert hash_seed("xxhash") == derived
    assert none_hash("xxhash") == get_hash_fn("xxhash")(derived)


def test_pythonhashseed_wins_over_the_cluster_secret(no_shared_seed, monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "42")
    install_cluster_hash_seed(b"k" * 32)
    assert shared_hash_seed("xxhash") == "42" and shared_hash_seed("sha256_cbor") == "42"


def test_xxhash_alone_in_a_process_is_seeded_at_random_as_vllm_does():
    code = "from common.block_hash import none_hash; print(none_hash('xxhash').hex())"
    first = _run_python(code, {"PYTHONHASHSEED": None, "PDSERVE_CLUSTER_SECRET": None})
    assert first != _run_python(code, {"PYTHONHASHSEED": None, "PDSERVE_CLUSTER_SECRET": None})
    assert _run_python(code, {"PYTHONHASHSEED": "9"}) == _run_python(code, {"PYTHONHASHSEED": "9"})


def test_cbor_is_cbor2s_canonical_encoding():
    import cbor2

    value = (
        b"\x00" * 32,
        tuple(range(0, 70000, 997)),
        (("lora", "a", "/p"), ("mm", "id", 2**40), ("cache_salt", "s")),
    )
    assert cbor_encode(value) == cbor2.dumps(value, canonical=True)
