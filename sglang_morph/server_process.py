"""A real sglang-morph server in a subprocess, the one definition used by the tests (one server
per module), the benchmarks, the calibration, the engine environment and the evaluation harness:
all of them must exercise the launcher a user runs, and all of them must stop it completely, also
when their own process is killed (a server left behind holds its port and a core)."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sglang_morph.client import MorphClient
from sglang_morph.paths import REPO_ROOT

LAUNCHER = "sglang_morph.launch_server"
HEALTH_TIMEOUT_S = float(os.environ.get("MORPH_TEST_HEALTH_TIMEOUT", "240"))
PORT_ATTEMPTS = 3
"""Starts tried on freshly chosen ports when the chosen port was taken before the bind."""


class ServerError(RuntimeError):
    """A server that did not become healthy; the message carries its log tail."""


def free_port() -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``host:port`` (checked before start, to fail clearly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Server:
    """Starts ``python -m <module> --host H --port P ARGS`` in its own process group (so stopping
    reaches SGLang's scheduler and detokenizer children too) and waits until /health answers.

    Raises ServerError, with the log tail, when the port is taken, the process exits early or
    health does not come within ``health_timeout_s``. ``SGLANG_MORPH_CONFIG`` is never inherited:
    each server's morph configuration comes from its own arguments.
    """

    def __init__(
        self,
        args: list[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        module: str = LAUNCHER,
        env: dict[str, str] | None = None,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
    ) -> None:
        if port is not None and not port_is_free(port, host):
            raise ServerError(f"port {port} on {host} is already in use; pick another port")
        if log_path is None:
            log_path = Path(tempfile.mkstemp(prefix="morph-server-", suffix=".log")[1])
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if k != "SGLANG_MORPH_CONFIG"}
        full_env.update(env or {})
        # The child runs outside the repository (SGLang must import installed packages only),
        # with the repository on its path so a checkout without an editable install still works.
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p
        )
        # A port the OS called free can be taken before the server binds it (a client's
        # ephemeral port, typically while another replay opens connections): a chosen port is
        # then chosen again.
        for attempt in range(1 if port is not None else PORT_ATTEMPTS):
            self.port = port or free_port()
            self.url = f"http://{host}:{self.port}"
            self.client = MorphClient(self.url)
            cmd = [sys.executable, "-m", module, "--host", host, "--port", str(self.port), *args]
            self._spawn(cmd, full_env)
            try:
                self._wait_healthy(health_timeout_s)
                return
            except ServerError:
                self.stop()
                if port is not None or attempt + 1 == PORT_ATTEMPTS or not self._bind_failed():
                    raise
            except BaseException:  # also Ctrl-C: the server is in its own session, would live on
                self.stop()
                raise

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=tempfile.gettempdir(), env=env, start_new_session=True,
                preexec_fn=functools.partial(_die_with_owner, os.getpid()),
            )  # fmt: skip

    def _bind_failed(self) -> bool:
        """Whether the server's log says its port was taken when it tried to bind."""
        return "address already in use" in self.tail(20).lower()

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"server exited with status {self.proc.returncode} before becoming healthy; "
                    f"log {self.log_path}:\n{self.tail()}"
                )
            if self.client.health():
                return
            time.sleep(0.5)
        raise ServerError(
            f"server not healthy after {timeout_s:.0f} s; log {self.log_path}:\n{self.tail()}"
        )

    def tail(self, lines: int = 40, width: int = 240) -> str:
        """The log's last ``lines`` lines, each cut to ``width`` characters (SGLang logs its
        whole configuration on one line of several kilobytes)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        tail = text.splitlines()[-lines:]
        return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in tail)

    def stop(self, grace_s: float = 20.0) -> None:
        """Terminate the process group, and kill it if it outlives ``grace_s``.

        The group is signalled even when the launcher has already exited: after a crash SGLang's
        detokenizer can outlive it and would keep a core busy for whatever runs next.
        """
        pgid = self.proc.pid  # start_new_session=True: the launcher leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            self.proc.wait(timeout=grace_s)
        deadline = time.monotonic() + grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)


PR_SET_PDEATHSIG = 1


def _die_with_owner(owner_pid: int) -> None:
    """In the launcher child before exec: SIGKILL it when its owner dies, however the owner dies
    (also ``kill -9``, where no cleanup code of the owner runs). SGLang's scheduler and
    detokenizer already die with the launcher (they set the same signal), so the whole server
    goes. Linux ties the signal to the creating thread: create servers from a thread that
    outlives them (the main thread, as every user here does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != owner_pid:  # the owner died before prctl took effect
        os._exit(1)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it. SGLang's scheduler and detokenizer rename
    themselves, so a server's processes are found by parentage, not by command line."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo += [int(c) for c in children]
        except OSError:
            pass
    return pids


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS); OSError when it has exited."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
