"""Screenshots of the MLflow UI over an atm tracking store, taken with headless Chromium.

    python tools/screenshots.py [--store sqlite:///mlflow.db | --tracking-uri http://host:5000] [--out DIR]
                                [--experiment atm] [--run RUN_ID ...] [--window-size 1920,1080] [--wait-ms 8000]

Starts ``mlflow server`` on loopback (a free port, one worker) over ``--store`` (or uses the server at
``--tracking-uri``) and writes PNGs into ``--out`` (default ``screenshots/``):

* ``runs.png``: the experiment's runs page (``#/experiments/<id>?workflowType=machine_learning``: the runs table,
  sweep trials unfolded under their parent, the Dataset and Models columns);
* ``sweep.png`` and ``best_trial.png``: the newest sweep parent run's page (description naming the best trial,
  the report's plots) and its best trial's (description linking its inputs, datasets, logged model, metrics);
* ``registered_model.png``: the registered model version of that sweep's best trial (``tracking.register_best``),
  when there is one;
* ``run_<id>.png`` for every ``--run``.

Chromium (``chromium``, ``chromium-browser``, ``google-chrome`` or ``chromium-headless-shell`` on ``PATH``, or
``--chromium``; Debian package ``chromium``) is driven over its DevTools pipe (standard library only): each page
gets ``--wait-ms`` to fetch and render (the UI is a single-page app), then the panels that open by themselves
(the MLflow Assistant) are closed and the sweep's trials unfolded before the viewport is saved. Exit status 2
with ``error: <one line>`` on bad input, a missing Chromium or store, or a server that does not start; 1 when
a screenshot could not be taken (one ``error:`` line each, the others are still written).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from atm.errors import ArgumentParser  # noqa: E402 - after the path set-up

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell")


class Failure(Exception):
    """A one-line reason to stop (exit status 2)."""


def find_browser(given: str | None) -> str:
    """The Chromium executable: ``given`` (a path or a name on ``PATH``), else the first of :data:`BROWSERS` on
    ``PATH``.

    Raises:
        Failure: none found (naming the Debian package to install).
    """
    for name in ([given] if given else BROWSERS):
        found = shutil.which(name)
        if found:
            return found
    if given:
        raise Failure(f"--chromium {given}: no such executable")
    raise Failure(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}): install the Debian package chromium "
                  "(apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, body: dict | None = None) -> dict:
    """A call of the MLflow REST API (``/api/2.0/mlflow/<path>``): GET, or POST with a JSON ``body``."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def start_server(store: str, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 (a free port, one worker) over the backend store ``store``, run in the store's
    directory (a SQLite file's; relative artifact locations are taken from there); returns ``(process, base URL)``
    once it answers.

    Raises:
        Failure: no SQLite file at ``store``; the server exited or did not answer within ``timeout_s``.
    """
    cwd = Path.cwd()
    if store.startswith("sqlite:///"):
        db = Path(store[len("sqlite:///"):])
        if not db.is_file():
            raise Failure(f"--store {store}: no MLflow store at {db.resolve()}")
        cwd = db.resolve().parent
        store = f"sqlite:///{db.resolve()}"
    port = _free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", store, "--workers", "1"], cwd=cwd, stdout=subprocess.DEVNULL,
                              stderr=log, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _get(base, "experiments/search?max_results=1")
            return server, base
        except OSError:
            if server.poll() is not None:
                log.seek(0)
                lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
                raise Failure(f"mlflow server over {store} exited with status {server.returncode}: "
                              f"{lines[-1] if lines else 'no output'}") from None
            if time.monotonic() > deadline:
                stop_server(server)
                raise Failure(f"mlflow server over {store} did not answer within {timeout_s:.0f} s") from None
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server started by :func:`start_server` (its process group: gunicorn/uvicorn workers too)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def pages(base: str, experiment: str, runs: Sequence[str]) -> list[tuple[str, str]]:
    """``(file name, UI route)`` of every page to take (see the module docstring).

    Raises:
        Failure: no experiment named ``experiment``.
    """
    import urllib.error

    try:
        found = _get(base, "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))
    except urllib.error.HTTPError as err:
        raise Failure(f"--experiment {experiment}: no such experiment at {base} (HTTP {err.code})") from None
    eid = found["experiment"]["experiment_id"]
    # the sidebar's GenAI / Model training switch (the browser's local storage, GenAI for a new browser) decides
    # what #/experiments/<id> opens and how a run page is filed; workflowType=machine_learning asks for training
    ml = "?workflowType=machine_learning"
    out = [("runs.png", f"#/experiments/{eid}{ml}")]
    parents = _get(base, "runs/search", {"experiment_ids": [eid], "max_results": 1,
                                         "filter": "tags.`atm.stage` = 'sweep'",
                                         "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    if parents:
        parent = parents[0]
        tags = {t["key"]: t.get("value", "") for t in parent["data"].get("tags", [])}
        out.append(("sweep.png", f"#/experiments/{eid}/runs/{parent['info']['run_id']}{ml}"))
        if tags.get("sweep.best_run_id"):
            out.append(("best_trial.png", f"#/experiments/{eid}/runs/{tags['sweep.best_run_id']}{ml}"))
        if tags.get("sweep.registered_model"):
            name, _, version = tags["sweep.registered_model"].rpartition("/")
            out.append(("registered_model.png", f"#/models/{urllib.parse.quote(name)}/versions/{version}{ml}"))
    out += [(f"run_{rid}.png", f"#/experiments/{eid}/runs/{rid}{ml}") for rid in runs]
    return out


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
    ending in a NUL byte, commands on the child's fd 3, answers on its fd 4); standard library only."""

    def __init__(self, executable: str, profile: Path, width: int, height: int):
        to_child, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def plumbing() -> None:  # in the child: the pipe ends at fds 3 and 4 (dup first: they may be 3 or 4)
            a, b = os.dup(to_child), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        command = [executable, "--headless", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage",
                   "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                   f"--window-size={width},{height}", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, close_fds=False, preexec_fn=plumbing, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=self._stderr, start_new_session=True)
        os.close(to_child)
        os.close(from_child_w)
        self._buffer, self._id = b"", 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, self.session)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout_s: float = 60) -> dict:
        """Send a DevTools command; return its result (events are skipped).

        Raises:
            Failure: Chromium exited, answered with an error, or not within ``timeout_s``.
        """
        import select

        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_child, json.dumps(message).encode() + b"\0")
        except OSError:
            raise Failure(f"Chromium exited: {self._last_error()}") from None
        deadline = time.monotonic() + timeout_s
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._from_child], [], [], left)[0]:
                    raise Failure(f"Chromium did not answer {method} within {timeout_s:.0f} s")
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise Failure(f"Chromium exited: {self._last_error()}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise Failure(f"Chromium refused {method}: {answer['error'].get('message')}")
                return answer.get("result", {})

    def _last_error(self) -> str:
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines()
                 if ln.strip() and "dbus" not in ln]
        return lines[-1] if lines else "no output"

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript ``expression`` in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self.session)
        return result.get("result", {}).get("value")

    def shoot(self, url: str, path: Path, wait_s: float) -> None:
        """Load ``url``, give the single-page app ``wait_s`` seconds to fetch and render, close the panels that
        open by themselves (the MLflow Assistant) and unfold the runs nested in a sweep, then write the viewport
        as the PNG ``path`` (whole or not at all).

        Raises:
            Failure: as :meth:`call`.
        """
        import base64

        self.call("Page.navigate", {"url": url}, self.session)
        time.sleep(wait_s)
        self.evaluate(TIDY)
        time.sleep(min(3.0, wait_s))
        data = self.call("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(base64.b64decode(data))
        os.replace(tmp, path)

    def close(self) -> None:
        """End Chromium (its process group)."""
        try:
            self.call("Browser.close", timeout_s=10)
        except Failure:
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass


#: JavaScript run on every page before its screenshot: close what opens by itself (the MLflow Assistant panel, a
#: first-visit hint), click the expander of each run with nested runs in the runs table (a sweep's trials) and
#: "Show more" of a long run description (a sweep parent's plots).
TIDY = """(() => {
  document.querySelectorAll('button[aria-label="Close"]').forEach(b => b.click());
  document.querySelectorAll('[id^="cell-attributes.`Run Name`"] button').forEach(b => b.click());
  [...document.querySelectorAll('button, a, [role=button]')].filter(b => (b.textContent || '').trim() === 'Show more')
    .forEach(b => b.click());
  return true;
})()"""


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (see the module docstring). Prints the path of every PNG written."""
    parser = ArgumentParser(prog="python tools/screenshots.py", description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--store", default="sqlite:///mlflow.db",
                       help="MLflow backend store to serve (default sqlite:///mlflow.db)")
    where.add_argument("--tracking-uri", default=None, help="a running MLflow server (http://...) to use instead")
    parser.add_argument("--experiment", default=os.environ.get("ATM_EXPERIMENT", "atm"), help="experiment name")
    parser.add_argument("--run", action="append", default=[], help="also a run's page (repeatable)")
    parser.add_argument("--out", default="screenshots", help="output directory (default screenshots/)")
    parser.add_argument("--window-size", default="1920,1080", help="browser window WIDTH,HEIGHT in pixels")
    parser.add_argument("--wait-ms", type=int, default=8000,
                        help="time each page gets to fetch and render before its screenshot, ms (default 8000)")
    parser.add_argument("--chromium", default=None, help="the Chromium executable (default: found on PATH)")
    args = parser.parse_args(argv)
    size = args.window_size.split(",")
    if len(size) != 2 or not all(s.isdigit() and int(s) > 0 for s in size):
        parser.error(f"--window-size {args.window_size!r} must be WIDTH,HEIGHT (positive integers)")
    if args.wait_ms <= 0:
        parser.error(f"--wait-ms {args.wait_ms} must be > 0")
    if args.tracking_uri and not args.tracking_uri.startswith(("http://", "https://")):
        parser.error(f"--tracking-uri {args.tracking_uri}: give a server (http://...); serve a store with --store")
    server = None
    try:
        browser = find_browser(args.chromium)
        if args.tracking_uri:
            base = args.tracking_uri.rstrip("/")
        else:
            server, base = start_server(args.store)
        try:
            todo = pages(base, args.experiment, args.run)
        except OSError as err:
            raise Failure(f"MLflow server {base} is not reachable: {err}") from None
        failed = 0
        width, height = (int(x) for x in size)
        with tempfile.TemporaryDirectory(prefix="atm-chromium-") as profile:
            chromium = Browser(browser, Path(profile), width, height)
            try:
                for name, route in todo:
                    path = Path(args.out) / name
                    try:
                        chromium.shoot(f"{base}/{route}", path, args.wait_ms / 1000)
                        print(path)
                    except Failure as err:
                        failed += 1
                        print(f"error: {name} ({route}): {err}", file=sys.stderr)
            finally:
                chromium.close()
        return 1 if failed else 0
    except Failure as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
