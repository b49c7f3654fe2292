"""A real sglang-morph server in a subprocess: used by the tests (one per module) and the
benchmarks, which must exercise the same launcher a user runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
HEALTH_TIMEOUT_S = float(os.environ.get("MORPH_TEST_HEALTH_TIMEOUT", "240"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Starts ``python -m <module>`` with ``args`` and waits until /health answers."""

    def __init__(self, args: list[str], module: str = "sglang_morph.launch_server",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="morph-server-", suffix=".log",
                                               delete=False)
        full_env = {k: v for k, v in os.environ.items() if k != "SGLANG_MORPH_CONFIG"}
        full_env.update(env or {})
        # Run from outside the repo: `python -m` from the repo root would shadow nothing here,
        # but SGLang's own launcher must import the installed packages only.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
            env=full_env, start_new_session=True,
        )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy after {HEALTH_TIMEOUT_S} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, json: object, **kw) -> requests.Response:
        return requests.post(self.url + path, json=json, timeout=kw.pop("timeout", 60), **kw)

    def generate(self, text: str, max_new_tokens: int = 30) -> str:
        r = self.post("/generate", {"text": text, "sampling_params": {
            "temperature": 0, "max_new_tokens": max_new_tokens}})
        r.raise_for_status()
        return r.json()["text"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
