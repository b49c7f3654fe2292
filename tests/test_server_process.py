"""``Server``'s port handling: a port chosen free and taken before the bind (a client's
ephemeral port, as happened mid-benchmark) is chosen again; a port the user named is never
replaced. The launcher is ``tests.health_stub`` here: what is tested is the process wrapper."""

from __future__ import annotations

import socket

import pytest

from sglang_morph import server_process
from sglang_morph.server_process import Server, ServerError, free_port


@pytest.fixture
def taken_port():
    """A port something listens on for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_chosen_port_taken_before_the_bind_is_chosen_again(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([taken_port])
    monkeypatch.setattr(server_process, "free_port", lambda: next(ports, None) or free_port())
    server = Server([], module="tests.health_stub", health_timeout_s=30)
    try:
        assert server.port != taken_port and server.client.health()
    finally:
        server.stop()


def test_a_named_port_that_is_taken_fails_clearly(taken_port: int) -> None:
    with pytest.raises(ServerError, match=f"port {taken_port} .* already in use"):
        Server([], port=taken_port, module="tests.health_stub", health_timeout_s=30)
