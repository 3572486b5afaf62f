"""The in-memory room structures behind memory and NATS presence: sorted ids in blocks (paging exact
against a plain sorted list under random churn) and the memory a member costs in a big room."""

from __future__ import annotations

import random
import tracemalloc
import uuid

import pytest

from wirehub.builtins.bus._roster import Roster, SortedIds
from wirehub.bus import PresenceCount, PresenceEntry


@pytest.mark.parametrize("load", [1, 2, 3, 8, 512])
def test_sorted_ids_page_like_a_sorted_list_under_churn(load: int) -> None:
    rng = random.Random(load)
    ids, reference = SortedIds(load), set()
    for step in range(3000):
        item = f"u{rng.randrange(500):03d}"
        if item in reference:
            ids.remove(item)
            reference.remove(item)
        else:
            ids.add(item)
            reference.add(item)
        if step % 101 == 0:
            ordered = sorted(reference)
            for after in [None, "", "a", "zz", *rng.sample(ordered, min(5, len(ordered)))]:
                rest = [u for u in ordered if after is None or u > after]
                for limit in (0, 1, 7, 37, 1000):
                    assert ids.after(after, limit) == (rest[:limit], limit > 0 and len(rest) > limit)
    assert len(ids) == len(reference)
    with pytest.raises(ValueError):
        ids.remove("not there")


def test_a_member_of_a_50000_member_room_costs_less_than_half_a_kib() -> None:
    """The issue's bound is idle-connection RSS + 1 KiB per member; presence takes well under half of it.
    (The entry itself is made by the handler for the session anyway; its strings are counted here.)"""
    entries = [PresenceEntry(f"user-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex, "node-1", {"name": f"U{i}"})
               for i in range(50_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        roster = Roster()
        for e in entries:
            assert roster.add(e) is True
        per_member = (tracemalloc.get_traced_memory()[0] - before) / len(entries)
    finally:
        tracemalloc.stop()
    assert roster.count() == PresenceCount(50_000, 50_000)
    assert per_member < 512, per_member
    page = roster.page(None, 37)
    assert [m.user for m in page.members] == sorted(e.user for e in entries)[:37]
    assert page.cursor == page.members[-1].user


def test_a_one_connection_user_costs_the_roster_only_its_dict_items() -> None:
    """Most users of a big room have one connection: the roster points at their entry (kept anyway)
    instead of a (connections, info) tuple of their own (56 bytes more each)."""
    entries = [PresenceEntry(f"user-{i:06d}", f"s{i:06d}", "node-1") for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        roster = Roster()
        for e in entries:
            roster.add(e)
        per_member = (tracemalloc.get_traced_memory()[0] - before) / len(entries)
    finally:
        tracemalloc.stop()
    assert per_member < 80, per_member  # two dict items and a pointer in SortedIds (a tuple each: about 107)


def test_a_user_is_counted_through_their_connections_with_the_first_ones_info() -> None:
    roster = Roster()
    first, second, third = (PresenceEntry("ann", f"s{i}", "n", {"name": f"Ann {i}"}) for i in (1, 2, 3))
    assert roster.add(first) is True
    assert roster.add(second) is False and roster.add(third) is False
    assert roster.add(second) is False  # idempotent
    for gone, left in ((first, 2), (third, 1)):
        assert roster.remove(gone.session) is None
        member = roster.page(None, 10).members[0]
        assert (member.user, member.connections, member.info) == ("ann", left, {"name": "Ann 1"})
    assert roster.count() == PresenceCount(1, 1)
    assert roster.remove(second.session) == "ann"
    assert roster.page(None, 10).members == [] and roster.count() == PresenceCount(0, 0)
    assert roster.add(third) is True
    assert roster.page(None, 10).members[0].info == {"name": "Ann 3"}
