"""Progress bars: on at a terminal or when asked, never in logs."""

from __future__ import annotations

import io

import pytest

from streams.progress import PROGRESS_ENV, bar, enabled, say


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def count_to(n: int, file: io.StringIO) -> str:
    with bar(n, "work", unit="records", file=file) as shown:
        for _ in range(n):
            shown.update(1)
    return file.getvalue()


def test_bars_show_at_a_terminal_and_not_in_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert "3/3" in count_to(3, Terminal()) and enabled(Terminal())
    assert count_to(3, io.StringIO()) == "" and not enabled(io.StringIO())


@pytest.mark.parametrize(("value", "shown"), [("1", True), ("0", False), ("yes", None), ("", None)])
def test_the_environment_forces_bars_on_or_off(monkeypatch: pytest.MonkeyPatch, value: str, shown: bool | None) -> None:
    monkeypatch.setenv(PROGRESS_ENV, value)
    for stream, at_terminal in ((Terminal(), True), (io.StringIO(), False)):
        expected = at_terminal if shown is None else shown  # an unknown value leaves the default
        assert enabled(stream) is expected
        assert ("3/3" in count_to(3, stream)) is expected


def test_say_prints_whole_lines_beside_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "1")
    out, err = io.StringIO(), io.StringIO()
    with bar(2, "work", file=err) as shown:
        shown.update(1)
        say("[stage] halfway", file=out)
    assert out.getvalue() == "[stage] halfway\n"
    assert "2" in err.getvalue()
