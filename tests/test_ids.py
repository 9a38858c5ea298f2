from __future__ import annotations

from dualwrite.ids import PUSH_CHARS, PushIdGenerator, timestamp_of


def test_100000_ids_are_unique_and_sorted_in_creation_order() -> None:
    generator = PushIdGenerator()
    ids = [generator.new_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 20 and set(i) <= set(PUSH_CHARS) for i in ids)


def test_ids_in_one_millisecond_increment_the_random_part() -> None:
    generator = PushIdGenerator(lambda: 1_700_000_000_000)
    first, second = generator.new_id(), generator.new_id()
    assert first[:8] == second[:8] and first < second
    assert timestamp_of(first) == 1_700_000_000_000


def test_a_clock_stepping_back_keeps_the_order() -> None:
    times = iter([2_000, 1_000, 3_000])
    generator = PushIdGenerator(lambda: next(times))
    ids = [generator.new_id() for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_time_prefix_matches_firebase_encoding() -> None:
    # Firebase's own push id for ms 0 starts with eight '-'.
    assert PushIdGenerator(lambda: 0).new_id().startswith("--------")
    assert timestamp_of(PushIdGenerator(lambda: 64).new_id()) == 64
