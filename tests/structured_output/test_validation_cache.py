"""The router's validation cache: one grammar-engine check per distinct spec, refusals
remembered with their message, a bounded LRU, and switches that tell specs apart."""

from __future__ import annotations

import threading

import pytest

from common.structured_output.spec import StructuredOutputSpec
from common.structured_output.validation_cache import ValidationCache
from tests.harness.torch_free import assert_imports_without_torch


def test_a_spec_is_checked_once_however_often_it_comes():
    cache = ValidationCache()
    spec = StructuredOutputSpec("regex", "[a-z]+")
    for _ in range(10):
        cache.check(spec)
    cache.check(StructuredOutputSpec("regex", "[a-z]+"))  # an equal spec, another object
    assert (cache.misses, cache.hits, len(cache)) == (1, 10, 1)


def test_a_refusal_is_remembered_with_the_engines_message():
    cache = ValidationCache()
    spec = StructuredOutputSpec("json", '{"type": "object", "properties": 5}')
    messages = []
    for _ in range(3):
        with pytest.raises(ValueError) as caught:
            cache.check(spec)
        messages.append(str(caught.value))
    assert messages[0].startswith("invalid JSON schema") and len(set(messages)) == 1
    assert (cache.misses, cache.hits) == (1, 2)


def test_the_switches_make_another_entry():
    cache = ValidationCache()
    cache.check(StructuredOutputSpec("json_object"))
    cache.check(StructuredOutputSpec("json_object", disable_any_whitespace=True))
    cache.check(StructuredOutputSpec("json_object", disable_additional_properties=True))
    assert (cache.misses, len(cache)) == (3, 3)


def test_the_least_recently_used_verdict_goes_first():
    cache = ValidationCache(capacity=2)
    a, b, c = (StructuredOutputSpec("regex", text) for text in ("a", "b", "c"))
    cache.check(a)
    cache.check(b)
    cache.check(a)  # a is now the most recent
    cache.check(c)  # evicts b
    assert len(cache) == 2
    misses = cache.misses
    cache.check(a)
    assert cache.misses == misses
    cache.check(b)
    assert cache.misses == misses + 1


def test_threads_checking_at_once_all_get_the_verdict():
    cache = ValidationCache()
    good, bad = StructuredOutputSpec("regex", "x+"), StructuredOutputSpec("regex", "x(")
    outcomes: list[str] = []

    def work() -> None:
        for _ in range(50):
            cache.check(good)
            try:
                cache.check(bad)
            except ValueError as exc:
                outcomes.append(str(exc))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 200 and all(o.startswith("invalid regex") for o in outcomes)
    assert len(cache) == 2 and cache.hits + cache.misses == 400


def test_a_capacity_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        ValidationCache(capacity=0)


def test_the_cache_is_torch_free():
    assert_imports_without_torch("common.structured_output.validation_cache")
