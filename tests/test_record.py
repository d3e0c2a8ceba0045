"""record.LaterLines: the decisions' log lines, written once the event that made them is handled."""

from __future__ import annotations

import asyncio

import pytest
from mitmproxy.test import taddons

from sealgate.addon import Sealgate
from sealgate.record import LaterLines
from sealgate.store import SecretStore


def test_a_decision_line_is_logged_once_the_event_that_made_it_is_handled():
    """On the event loop the lines go out at its next turn, in order (an allowed request is sent upstream
    first, the logging done while the upstream answers); stop writes them at once (sealgate's done), and
    every line after it; with no loop running, at once."""
    got: list[str] = []
    lines = LaterLines(got.append)

    async def main() -> None:
        lines.add("one")
        lines.add("two")
        assert got == []
        await asyncio.sleep(0)
        assert got == ["one", "two"]
        lines.add("three")
        lines.stop()  # as sealgate stops
        assert got == ["one", "two", "three"]
        lines.add("four")  # (a refusal while the connections close)
        assert got == ["one", "two", "three", "four"]

    asyncio.run(main())
    LaterLines(got.append).add("made outside")
    assert got[-1] == "made outside"


def test_done_writes_the_audit_trail_even_when_a_waiting_line_cannot_be_written(tmp_path):
    """Review (session 19): `done` wrote the waiting lines first, and a write that raised (a log filter's
    bug) ended it there: the audit queue was never written, nor the store closed."""
    SecretStore(tmp_path).close()
    addon = Sealgate()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, sealgate_data_dir=str(tmp_path))
        closed: list[float] = []
        addon.audit.close = closed.append  # type: ignore[method-assign]

        def broken(line: str) -> None:
            raise RuntimeError("a log filter's bug")
        addon.recorder.lines.write = broken
        addon.recorder.lines._lines.append("sealgate decision=allow")
        with pytest.raises(RuntimeError):
            addon.done()
        assert len(closed) == 1
