"""The reports in a real browser: headless Chromium, driven over the DevTools protocol.

Chromium runs with ``--remote-debugging-pipe``: it reads protocol commands (JSON, each ended
by a NUL byte) from file descriptor 3 and writes replies and events to descriptor 4, so the
standard library is enough (no websocket client, no Selenium). For each page the test opens a
fresh tab, enables the ``Runtime``, ``Log`` and ``Page`` domains *before* navigating, waits
for the load event and then collects:

* console errors: ``Runtime.consoleAPICalled`` of type error/assert, uncaught exceptions
  (``Runtime.exceptionThrown``) and browser log entries of level error (``Log.entryAdded``,
  where failed loads such as a missing image land: "Failed to load resource");
* images that did not load: ``img.complete && img.naturalWidth > 0`` evaluated in the page;
* horizontal overflow at 1280 px (the page must fit a laptop screen);
* a screenshot (``Page.captureScreenshot``), kept beside the test's files.

Skipped only when no Chromium binary exists.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bids_cadiff.bidsio import derivatives as deriv
from bids_cadiff.reports.html import write_group_report, write_participant_report
from bids_cadiff.reports.overlay import png_bytes

WIDTH, HEIGHT = 1280, 2000
#: Seconds allowed for Chromium to answer one protocol command (and to start).
TIMEOUT_S = 30.0


def _find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


CHROMIUM = _find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary (install Debian's 'chromium'; scripts/install.sh does it "
    "with the test extras)",
)

# In the page: which <img> did not load, how many there are, does the page overflow sideways.
_PAGE_STATE_JS = """(() => {
  const imgs = Array.from(document.images);
  return {
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    overflow: document.documentElement.scrollWidth > window.innerWidth,
  };
})()"""


@dataclass(frozen=True)
class PageCheck:
    """What the browser saw on one page."""

    errors: list[str]
    broken_images: list[str]
    images: int
    overflow: bool
    screenshot: Path

    @property
    def ok(self) -> bool:
        return not self.errors and not self.broken_images


def _above_9(fd: int) -> int:
    """Move ``fd`` to a number above 9, so that it is neither 3 nor 4 when bash places the
    pipe ends on 3 and 4 (it would close or overwrite it on the way)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (standard library only)."""

    def __init__(self, executable: str, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        to_child_r, from_child_w = _above_9(to_child_r), _above_9(from_child_w)
        env = dict(os.environ)  # a copy: nothing of Chromium's lands in the real home or /tmp
        env.update(HOME=str(workdir), TMPDIR=str(workdir), XDG_CONFIG_HOME=str(workdir / "cfg"),
                   XDG_CACHE_HOME=str(workdir / "cache"))
        args = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
            f"--user-data-dir={workdir / 'profile'}", f"--window-size={WIDTH},{HEIGHT}",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--mute-audio", "about:blank",
        ]
        # bash puts our pipe ends on the descriptors Chromium expects (3: commands, 4: replies).
        script = (f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} '
                  f"{to_child_r}<&- {from_child_w}>&-")
        self._stderr = open(workdir / "chromium.log", "wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", script, executable, *args],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
            stdout=self._stderr, stderr=self._stderr, env=env, start_new_session=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self.send("Browser.getVersion")  # waits until Chromium is up

    # ------------------------------------------------------------------ protocol

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Chromium did not answer in time; log: {self.log_tail()}")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe; log: {self.log_tail()}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result (events met meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and event.get("sessionId") == session:
                    return event
            seen = len(self.events)
            reply = self._read_message(deadline)
            if "method" in reply:
                self.events.append(reply)

    def log_tail(self) -> str:
        self._stderr.flush()
        return (self.workdir / "chromium.log").read_text(errors="replace")[-2000:]

    # ------------------------------------------------------------------ pages

    def check(self, page: Path, screenshot: Path) -> PageCheck:
        """Open ``page`` in a fresh tab; collect errors and broken images; screenshot it."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Page", "Runtime", "Log"):
                self.send(f"{domain}.enable", session=session)
            self.send("Emulation.setDeviceMetricsOverride",
                      {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
                      session=session)
            first_event = len(self.events)
            nav = self.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            if nav.get("errorText"):
                raise RuntimeError(f"cannot open {page}: {nav['errorText']}")
            self.wait_for("Page.loadEventFired", session)
            state = self.send("Runtime.evaluate",
                              {"expression": _PAGE_STATE_JS, "returnByValue": True},
                              session=session)["result"]["value"]
            shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            errors = [_error_text(e) for e in self.events[first_event:]
                      if e.get("sessionId") == session and _is_error(e)]
        finally:
            self.send("Target.closeTarget", {"targetId": target})
        return PageCheck(errors, list(state["broken"]), int(state["images"]),
                         bool(state["overflow"]), screenshot)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session's processes only
            self.proc.wait(timeout=10)
        os.close(self._to_child)
        os.close(self._from_child)
        self._stderr.close()


def _is_error(event: dict[str, Any]) -> bool:
    method, params = event["method"], event.get("params", {})
    if method == "Runtime.exceptionThrown":
        return True
    if method == "Runtime.consoleAPICalled":
        return params.get("type") in ("error", "assert")
    if method == "Log.entryAdded":
        return params.get("entry", {}).get("level") == "error"
    return False


def _error_text(event: dict[str, Any]) -> str:
    params = event.get("params", {})
    if event["method"] == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        return "uncaught: " + str(details.get("exception", {}).get("description")
                                  or details.get("text"))
    if event["method"] == "Runtime.consoleAPICalled":
        return "console.error: " + " ".join(
            str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
    entry = params.get("entry", {})
    return f"log: {entry.get('text')} ({entry.get('url', '')})"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium"))
    yield b
    b.close()


# --------------------------------------------------------------------------- the checker itself


def _write_png(path: Path) -> None:
    path.write_bytes(png_bytes(np.full((8, 8, 3), 200, np.uint8)))


def test_check_passes_a_clean_page(browser, tmp_path):
    _write_png(tmp_path / "ok.png")
    page = tmp_path / "clean.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head>'
                    '<body><img src="ok.png" alt=""></body></html>')
    result = browser.check(page, tmp_path / "clean.png")
    assert result.ok, result
    assert result.images == 1 and not result.overflow


def test_check_catches_a_missing_image(browser, tmp_path):
    _write_png(tmp_path / "ok.png")
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img src="ok.png" alt=""><img src="figures/missing.png" alt=""></body></html>')
    result = browser.check(page, tmp_path / "broken.png")
    assert not result.ok
    assert result.broken_images == ["figures/missing.png"]
    assert any("missing.png" in e for e in result.errors), result.errors  # failed load logged


def test_check_catches_console_errors_and_exceptions(browser, tmp_path):
    page = tmp_path / "script.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    "<script>console.error('deliberate failure');</script>"
                    "<script>undefinedFunction();</script><p>text</p></body></html>")
    result = browser.check(page, tmp_path / "script.png")
    assert not result.ok
    assert any("deliberate failure" in e for e in result.errors), result.errors
    assert any("undefinedFunction" in e for e in result.errors), result.errors


# --------------------------------------------------------------------------- the reports


@pytest.fixture(scope="module")
def reports(fake_derivatives):
    root = fake_derivatives.root
    pages = {f"sub-{s}": write_participant_report(root, s) for s in ("01", "03", "04", "08")}
    pages["group"] = write_group_report(root)
    return pages


# name -> fewest <img> the page must show (sub-01: two T1w with four figures each)
EXPECTED_IMAGES = {"sub-01": 8, "sub-03": 1, "sub-04": 4, "sub-08": 0, "group": 0}


@pytest.mark.parametrize("name", sorted(EXPECTED_IMAGES))
def test_report_loads_without_errors(browser, reports, name, tmp_path):
    result = browser.check(reports[name], tmp_path / f"{name}.png")
    assert result.errors == [], f"console errors in {reports[name].name}: {result.errors}"
    assert result.broken_images == [], f"images that did not load: {result.broken_images}"
    assert result.images == EXPECTED_IMAGES[name]
    assert not result.overflow, f"{reports[name].name} is wider than {WIDTH} px"
    shot = result.screenshot.read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 5000


def test_report_with_a_deleted_figure_fails_the_check(browser, fake_derivatives, tmp_path):
    """A report whose figure disappeared after writing is caught (a copy, not the fixture)."""
    root = tmp_path / "out"
    shutil.copytree(fake_derivatives.root, root)
    page = write_participant_report(root, "01")
    deriv.figure_path(root, {"subject": "01", "session": "1"}, "contours").unlink()
    result = browser.check(page, tmp_path / "deleted.png")
    assert [Path(src).name for src in result.broken_images] == [
        "sub-01_ses-1_desc-cadiff_contours.png"
    ]
    assert result.errors
