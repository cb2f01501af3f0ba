"""The retrain policy, table-tested: window size, streaks per drift kind, triggers, cooldown, the hourly cap, ids."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from jobs.policy import PolicyState, WindowResult, decide
from streams.config import RetrainSettings

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
SETTINGS = RetrainSettings(min_window=100, consecutive=2, cooldown_s=600, max_per_hour=2)


def run(windows: list[tuple[int, bool, float]], settings: RetrainSettings = SETTINGS) -> list[bool]:
    """Feed (size, drifted, minutes since T0) windows in order; which ones asked for a retrain."""
    state = PolicyState()
    out = []
    for i, (size, drifted, minutes) in enumerate(windows):
        d = decide("p", settings, state, WindowResult(size, drifted, T0 + timedelta(minutes=minutes), f"w{i}"))
        state = d.state
        out.append(d.retrain)
        assert (d.request is not None) == d.retrain
    return out


@pytest.mark.parametrize(
    ("windows", "expected"),
    [
        ([(500, True, 0)], [False]),  # one drifted window is not enough
        ([(500, True, 0), (500, True, 1)], [False, True]),  # two in a row
        ([(500, True, 0), (500, False, 1), (500, True, 2)], [False, False, False]),  # streak broken
        ([(500, True, 0), (50, False, 1), (500, True, 2)], [False, False, True]),  # a small window decides nothing
        ([(50, True, 0), (50, True, 1)], [False, False]),  # too small to count
        # cooldown: after a retrain at minute 1, the next streak completes at minute 3 (< 10): refused
        ([(500, True, 0), (500, True, 1), (500, True, 2), (500, True, 3)], [False, True, False, False]),
        # after the cooldown the streak goes on
        ([(500, True, 0), (500, True, 1), (500, True, 12), (500, True, 13)], [False, True, False, True]),
        # the hourly cap: retrains at 1 and 13; the one at 25 would be the third in an hour; at 62
        # the one at 1 is over an hour old, so the still-running streak retrains
        (
            [(500, True, m) for m in (0, 1, 12, 13, 24, 25)] + [(500, True, 62), (500, True, 63)],
            [False, True, False, True, False, False, True, False],
        ),
    ],
)
def test_decisions(windows: list[tuple[int, bool, float]], expected: list[bool]) -> None:
    assert run(windows) == expected


def test_the_request_id_is_the_same_for_the_same_window_and_differs_otherwise() -> None:
    state = PolicyState(streaks={"data": 1})
    a = decide("p", SETTINGS, state, WindowResult(500, True, T0, "records/0:0-500"))
    b = decide("p", SETTINGS, state, WindowResult(500, True, T0 + timedelta(seconds=5), "records/0:0-500"))
    c = decide("p", SETTINGS, state, WindowResult(500, True, T0, "records/0:500-1000"))
    assert a.request is not None and b.request is not None and c.request is not None
    assert a.request.event_id == b.request.event_id != c.request.event_id
    assert a.request.data_end == T0 and a.request.pipeline == "p"


def test_consecutive_one_retrains_on_the_first_drifted_window() -> None:
    assert run([(500, True, 0)], RetrainSettings(min_window=1, consecutive=1, cooldown_s=0)) == [True]


D, P, PERF = ("data",), ("prediction",), ("performance",)
DATA_WINDOW = ("data", "prediction")


def run_kinds(windows: list[tuple[tuple[str, ...], tuple[str, ...]]], **settings: object) -> list[bool]:
    """Feed (kinds measured, kinds drifted) windows, a minute apart; which ones asked for a retrain."""
    config = RetrainSettings(min_window=100, consecutive=2, cooldown_s=0, max_per_hour=100, **settings)  # type: ignore[arg-type]
    state, out = PolicyState(), []
    for i, (kinds, drifted) in enumerate(windows):
        result = WindowResult(500, bool(drifted), T0 + timedelta(minutes=i), f"w{i}", T0 + timedelta(minutes=i),
                              kinds=kinds, drifted_kinds=drifted)  # type: ignore[arg-type]  # fmt: skip
        d = decide("p", config, state, result)
        state = d.state
        out.append(d.retrain)
    return out


@pytest.mark.parametrize(
    ("windows", "settings", "expected"),
    [
        # the defect: healthy performance windows between drifted data windows reset the one streak,
        # so while labels flowed data drift never retrained. Each kind now keeps its own streak.
        ([(DATA_WINDOW, D), (PERF, ()), (DATA_WINDOW, D)], {}, [False, False, True]),
        # a healthy data window does reset the data streak
        ([(DATA_WINDOW, D), (DATA_WINDOW, ()), (DATA_WINDOW, D)], {}, [False, False, False]),
        # a data window that measured no prediction drift resets the prediction streak, not performance
        ([(PERF, PERF), (DATA_WINDOW, ()), (PERF, PERF)], {}, [False, False, True]),
        # two kinds that each drifted once are no streak of either
        ([(DATA_WINDOW, D), (DATA_WINDOW, P)], {}, [False, False]),
        # class-mix change: the prediction kind alone
        ([(DATA_WINDOW, P), (DATA_WINDOW, P)], {}, [False, True]),
        # a kind that is not a trigger never retrains, however long its streak
        ([(DATA_WINDOW, P)] * 3, {"triggers": ("performance", "data")}, [False, False, False]),
        ([(PERF, PERF), (PERF, PERF)], {"triggers": ("data",)}, [False, False]),
        # all: every listed kind's streak at once
        (
            [(DATA_WINDOW, D), (DATA_WINDOW, D), (PERF, PERF), (PERF, PERF)],
            {"triggers": ("performance", "data"), "combine": "all"},
            [False, False, False, True],
        ),
        (
            [(PERF, PERF), (PERF, PERF), (DATA_WINDOW, ()), (DATA_WINDOW, D)],
            {"triggers": ("performance", "data"), "combine": "all"},
            [False, False, False, False],
        ),
        # after a retrain every streak starts again
        ([(DATA_WINDOW, D), (DATA_WINDOW, D), (DATA_WINDOW, D), (DATA_WINDOW, D)], {}, [False, True, False, True]),
    ],
)
def test_streaks_per_kind_and_triggers(
    windows: list[tuple[tuple[str, ...], tuple[str, ...]]], settings: dict[str, object], expected: list[bool]
) -> None:
    assert run_kinds(windows, **settings) == expected


def test_the_data_window_starts_at_the_earliest_triggering_streak() -> None:
    config = RetrainSettings(min_window=1, consecutive=2, cooldown_s=0)
    state = PolicyState()
    windows = [(D, 0), (PERF, 1), (D, 2)]
    for i, (kinds, minute) in enumerate(windows):
        at = T0 + timedelta(minutes=minute)
        d = decide("p", config, state, WindowResult(10, True, at, f"w{i}", at, kinds=kinds))  # type: ignore[arg-type]
        state = d.state
    assert d.retrain and d.request is not None and d.request.data_start == T0
    assert "2 consecutive drifted data windows" in d.reason


def test_the_request_carries_the_records_offsets_from_where_the_drift_began() -> None:
    """Offsets, not clocks: the records topic as it stood when the first window of the streak opened."""
    from streams.events import OffsetRange

    def at(*ends: int) -> tuple[OffsetRange, ...]:
        return tuple(OffsetRange(topic="p.records", partition=i, start=e, end=e) for i, e in enumerate(ends))

    def seen(opened: tuple[OffsetRange, ...], closed: tuple[OffsetRange, ...]) -> tuple[OffsetRange, ...]:
        return tuple(
            OffsetRange(topic=a.topic, partition=a.partition, start=a.start, end=b.end)
            for a, b in zip(opened, closed, strict=True)
        )

    config = RetrainSettings(min_window=1, consecutive=2, cooldown_s=0)
    state = PolicyState()
    old = datetime(1999, 1, 1, tzinfo=timezone.utc)  # event times from a replayed file: no use as a window
    windows = [(False, at(0, 0), at(40, 50)), (True, at(40, 50), at(90, 95)), (True, at(90, 95), at(130, 150))]
    for i, (drifted, opened, closed) in enumerate(windows):
        window = WindowResult(10, drifted, old, f"w{i}", old, records=seen(opened, closed))
        d = decide("p", config, state, window)
        state = d.state
    assert d.retrain and d.request is not None
    assert [(r.partition, r.start, r.end) for r in d.request.records] == [(0, 40, 130), (1, 50, 150)]
    assert d.state.streak_records == {}, "a request starts every streak afresh"
