"""The private parts of mitmproxy sealgate relies on: present here, checked at start-up, and
never a silent pass-through when one is missing."""

from __future__ import annotations

import asyncio
import io
import threading
from contextlib import redirect_stderr

import pytest
from mitmproxy import command, master, options
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers import websocket as ws_layer

from conftest import free_port
from sealgate import cli, internals
from sealgate.streams import StreamFilter, StreamRewriter


def test_every_internal_is_present_in_the_installed_mitmproxy():
    assert internals.problems() == []


@pytest.mark.parametrize("owner, name", [
    (ws_layer.WebsocketConnection, "send2"),
    (http_layer.HttpStream, "state_stream_request_body"),
])
def test_a_missing_internal_is_named(monkeypatch, owner, name):
    monkeypatch.delattr(owner, name)
    found = internals.problems()
    assert any(name in p for p in found) and "checked against mitmproxy" in found[-1]
    with pytest.raises(internals.InternalsMissing, match=name):
        internals.require()


def test_run_refuses_to_start_without_an_internal(monkeypatch, tmp_path):
    monkeypatch.delattr(ws_layer.WebsocketConnection, "send2")
    env = {"SEALGATE_DATA_DIR": str(tmp_path / "data"), "SEALGATE_CERTS_DIR": str(tmp_path / "certs"),
           "SEALGATE_LISTEN_PORT": str(free_port())}
    result: dict = {}
    err = io.StringIO()

    def run():
        with redirect_stderr(err):
            result["code"] = cli.main(["run", "--no-web", "--no-metrics"], env=env)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "sealgate run started although an internal is missing"
    assert result["code"] == 1
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sealgate: error:") and "send2" in lines[0]


class _Event:  # stands in for the event mitmproxy's stream caller handles
    pass


class RequestEndOfMessage(_Event):
    pass


class RequestData(_Event):
    pass


def _mitmproxy_calls(stream, chunk: bytes, event):  # noqa: ARG001 - `event` is read from this frame
    return stream(chunk)


def test_end_of_message_is_told_from_an_empty_frame_by_the_callers_event():
    seen = []
    f = StreamFilter(StreamRewriter(lambda b: [], lambda: 4), internals.end_of_message, seen.append)
    assert _mitmproxy_calls(f, b"abc", RequestData()) == []  # held back: a match may still span it
    assert _mitmproxy_calls(f, b"", RequestData()) == []  # an empty frame mid-body: nothing flushed
    assert _mitmproxy_calls(f, b"", RequestEndOfMessage()) == [b"abc"]  # the end: the rest goes
    assert seen == []


def test_end_of_message_without_the_callers_event_refuses_rather_than_flushes():
    refused = []
    f = StreamFilter(StreamRewriter(lambda b: [], lambda: 4), internals.end_of_message, refused.append)
    f(b"abcdef")
    assert f(b"") == [] and isinstance(refused[0], internals.InternalsMissing)
    assert f(b"more") == []  # and nothing after it


class _NewAddon:
    """An addon a future mitmweb might bring: not on the allowlist, so it must not run."""

    @command.command("newaddon.fetch")
    def fetch(self) -> None:
        raise AssertionError("must not be reachable")


def test_only_allowlisted_addons_and_their_commands_remain():
    async def go():
        m = master.Master(options.Options())
        m.addons.add(_NewAddon())
        assert "newaddon.fetch" in m.commands.commands
        removed = internals.keep_only_addons(m, ["Core"])
        return m, removed
    m, removed = asyncio.run(go())
    assert "_NewAddon" in removed
    assert "newaddon.fetch" not in m.commands.commands
    assert all(type(a).__name__ == "Core" for a in m.addons.chain)


# --- the package -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_the_package_imports_as_sealgate_and_not_as_addons(tmp_path):
    import subprocess
    import sys

    def imports(name: str) -> bool:
        return subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True).returncode == 0
    assert imports("sealgate") and imports("sealgate.addon")
    assert not imports("addons")


def test_default_paths_are_under_the_working_directory(tmp_path, monkeypatch):
    from sealgate import settings

    monkeypatch.chdir(tmp_path)
    s = settings.load({}, env={})
    assert (s.data_dir, s.certs_dir) == (tmp_path / "data", tmp_path / "certs")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "sealgate.yaml").write_text("data_dir: store\nlisten_port: 9999\n")
    s = settings.load({}, env={})
    assert s.data_dir == tmp_path / "config" / "store" and s.listen_port == 9999


def test_no_class_in_the_package_is_over_250_lines():
    import ast
    import pathlib

    import sealgate
    sizes = {f"{p.name}:{n.name}": n.end_lineno - n.lineno + 1
             for p in pathlib.Path(sealgate.__file__).parent.glob("*.py")
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}
    assert {k: v for k, v in sizes.items() if v > 250} == {}




def test_direct_hooks_run_each_addon_in_order_log_an_error_as_mitmproxy_does_and_stop_at_addon_halt(caplog):
    from mitmproxy import exceptions
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow

    seen: list[str] = []

    class Named:
        def __init__(self, name: str, do=None) -> None:
            self.name, self.do = name, do

        def request(self, flow) -> None:
            seen.append(self.name)
            if self.do:
                raise self.do

    class Async:
        name = "async"

        async def request(self, flow) -> None:
            await asyncio.sleep(0)
            seen.append("async")

    async def go(*addons):
        m = master.Master(options.Options())
        internals.trim_master(m)
        m.addons.add(*addons)
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))

    asyncio.run(go(Named("a", ValueError("boom")), Async(), Named("b", exceptions.AddonHalt()), Named("c")))
    assert seen == ["a", "async", "b"]  # an error: logged, the next addon runs; AddonHalt: none after it
    [record] = [r for r in caplog.records if "Addon error" in r.getMessage()]
    assert record.getMessage() == "Addon error: boom" and record.exc_info and record.levelname == "ERROR"
    with pytest.raises(exceptions.OptionsError):
        asyncio.run(go(Named("d", exceptions.OptionsError("bad option"))))


def test_lean_handle_hook_disarms_the_idle_watchdog_for_the_hook_and_waits_for_an_intercepted_flow():
    from types import SimpleNamespace

    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.proxy import mode_servers, server
    from mitmproxy.test import tflow

    internals.lean_hooks()
    during: list[tuple[int, bool]] = []

    async def go() -> None:
        async def timed_out() -> None: ...
        watchdog = server.TimeoutWatchdog(600, timed_out)

        async def handle_lifecycle(hook) -> None:
            during.append((watchdog.blocker, watchdog.can_timeout.is_set()))
            if getattr(hook, "fail", False):
                raise RuntimeError("addon failed")

        handler = SimpleNamespace(timeout_watchdog=watchdog,
                                  master=SimpleNamespace(addons=SimpleNamespace(handle_lifecycle=handle_lifecycle)))
        hook = HttpRequestHook(tflow.tflow())
        await mode_servers.ProxyConnectionHandler.handle_hook(handler, hook)
        assert (watchdog.blocker, watchdog.can_timeout.is_set()) == (0, True)

        hook.fail = True
        with pytest.raises(RuntimeError):
            await mode_servers.ProxyConnectionHandler.handle_hook(handler, hook)
        assert (watchdog.blocker, watchdog.can_timeout.is_set()) == (0, True)  # re-armed all the same

        flow = tflow.tflow()
        flow.intercept()
        task = asyncio.ensure_future(mode_servers.ProxyConnectionHandler.handle_hook(handler, HttpRequestHook(flow)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done() and watchdog.blocker == 1  # held while intercepted, not timed out meanwhile
        flow.resume()
        await asyncio.wait_for(task, 5)
        assert (watchdog.blocker, watchdog.can_timeout.is_set()) == (0, True)

    asyncio.run(go())
    assert during == [(1, False)] * 3
