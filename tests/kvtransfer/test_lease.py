"""The producer's lease table: blocks go back once, on notice or at expiry."""

from __future__ import annotations

import time

import pytest

from kvtransfer.lease import LeaseTable


def test_a_notified_request_is_freed_once():
    leases = LeaseTable()
    leases.add("a", [1, 2], duration_s=30)
    assert leases.take_freed() == []
    assert leases.notify("a") is True
    assert leases.notify("a") is False  # a late duplicate changes nothing
    assert leases.take_freed() == ["a"]
    assert leases.take_freed() == []
    assert leases.num_notified == 1


def test_an_unnotified_request_is_freed_when_its_lease_expires():
    leases = LeaseTable()
    leases.add("short", [1], duration_s=0.05)
    leases.add("long", [2], duration_s=30)
    time.sleep(0.1)
    assert leases.take_freed() == ["short"]
    assert leases.num_expired == 1
    assert leases.notify("short") is False
    assert len(leases) == 1


def test_only_blocks_leased_to_the_request_may_be_read():
    leases = LeaseTable()
    leases.add("a", [3, 4], duration_s=30)
    assert leases.holds("a", [4]) is None
    assert "do not belong" in leases.holds("a", [4, 5])
    assert "holds no blocks" in leases.holds("b", [3])
    leases.notify("a")
    assert "holds no blocks" in leases.holds("a", [3])


def test_a_request_cannot_be_exported_twice_while_leased():
    leases = LeaseTable()
    leases.add("a", [1], duration_s=30)
    with pytest.raises(ValueError, match="already has exported blocks"):
        leases.add("a", [2], duration_s=30)
