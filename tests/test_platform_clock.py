"""The platform's clock as the client measures it (pure logic; the HTTP path is in
test_exactly_once.py)."""

from __future__ import annotations

import math

import pytest

from orchestrator.northbound.clock import PlatformClock, parse_platform_time


def test_before_any_reply_the_offset_is_zero_and_unknown() -> None:
    """With no sample the clock says offset 0 and an infinite uncertainty."""
    clock = PlatformClock(local=lambda: 1000.0)
    assert (clock.offset, clock.uncertainty, clock.measured) == (0.0, math.inf, False)


def test_samples_intersect_to_about_a_second() -> None:
    """Replies stamped at different fractions of a second narrow the bound below a second."""
    clock = PlatformClock(local=lambda: 0.0)
    true_offset = 600.4
    for sent in (10.0, 20.3, 30.7, 41.1):
        received = sent + 0.05
        stamped = math.floor(sent + 0.02 + true_offset)  # whole seconds, like a Date header
        clock.observe(stamped, sent, received)
    assert clock.offset == pytest.approx(true_offset, abs=0.5)
    assert clock.uncertainty < 0.5


def test_a_jump_of_the_platforms_clock_restarts_the_bound() -> None:
    """A sample that contradicts the bound (the platform's clock was set) replaces it."""
    clock = PlatformClock(local=lambda: 0.0)
    clock.observe(1000.0, 100.0, 100.1)  # offset ≈ 900
    clock.observe(1700.0, 200.0, 200.1)  # offset ≈ 1500: the clock jumped
    assert clock.offset == pytest.approx(1500.0, abs=1.0)


def test_an_old_reading_of_the_clock_before_a_jump_is_ignored() -> None:
    """A sample from before a jump, fed after newer ones (a createTime kept in the journal),
    does not pull the bound back to the old clock."""
    clock = PlatformClock(local=lambda: 0.0)
    clock.observe(22000.0, 500.0, 500.1)  # offset ≈ 21500, now
    clock.observe(101.0, 100.0, 100.2)  # offset ≈ 1: a task created before the jump
    assert clock.offset == pytest.approx(21500.0, abs=1.0)


def test_now_is_local_time_plus_the_offset() -> None:
    """`now()` is the platform's time: our clock plus the measured offset."""
    clock = PlatformClock(local=lambda: 5000.0)
    clock.observe(4400.0, 4999.0, 5000.0)  # the platform runs ~10 min behind
    assert clock.now() == pytest.approx(4400.0, abs=1.5)


def test_a_malformed_date_header_is_ignored() -> None:
    """A missing or malformed Date header is no sample."""
    clock = PlatformClock()
    clock.observe_date_header("yesterday-ish", 1.0, 2.0)
    clock.observe_date_header(None, 1.0, 2.0)
    assert not clock.measured


def test_platform_time_text_is_parsed_or_none() -> None:
    """`yyyyMMdd'T'HHmmss'Z'` parses to epoch seconds; anything else is None."""
    assert parse_platform_time("20151212T121212Z") == 1449922332.0
    assert parse_platform_time("") is None and parse_platform_time("2015-12-12") is None
