"""Fixtures for the macp-sdk-python interop suite.

The suite talks to an already running `macp-runtime --dev` whose address is in
`MACP_INTEROP_TARGET` (host:port); `run.sh` starts one and sets it. For a
cluster it holds several addresses, comma-separated: each agent's client then
connects to the next node in turn, so the agents of one test talk to
different nodes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import pytest
from macp_sdk import AuthConfig, MacpClient, MacpStream

# Seconds any single RPC or stream read may take before the test fails
# (instead of hanging CI).
TIMEOUT = float(os.environ.get("MACP_INTEROP_TIMEOUT", "10"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "readonly: needs a runtime started with --policies-dir tests/interop/policies (run.sh's readonly pass)",
    )


@pytest.fixture(scope="session")
def targets() -> list[str]:
    value = os.environ.get("MACP_INTEROP_TARGET")
    if not value:
        pytest.fail("MACP_INTEROP_TARGET is not set: run tests/interop/run.sh, or start a dev server yourself")
    return [t.strip() for t in value.split(",") if t.strip()]


@pytest.fixture(scope="session")
def target(targets: list[str]) -> str:
    return targets[0]


@pytest.fixture
def agent(targets: list[str]) -> Iterator[Callable[[str], MacpClient]]:
    """Factory: one MacpClient (own channel) per agent, authenticated the way
    the SDK documents for local development (`AuthConfig.for_dev_agent`);
    with several targets (a cluster), the clients go to the nodes in turn."""
    clients: list[MacpClient] = []

    def make(agent_id: str) -> MacpClient:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = MacpClient(
                target=targets[len(clients) % len(targets)],
                allow_insecure=True,
                auth=AuthConfig.for_dev_agent(agent_id),
                default_timeout=TIMEOUT,
            )
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


class Subscriber:
    """A passive StreamSession subscriber (RFC-MACP-0006 §3.2) built on the
    SDK's `MacpStream.send_subscribe`."""

    def __init__(self, client: MacpClient, session_id: str, after_sequence: int = 0) -> None:
        self.stream: MacpStream = client.open_stream()
        self.inline_errors: list[object] = []
        self.stream.on_inline_error(self.inline_errors.append)
        self.stream.send_subscribe(session_id, after_sequence)
        self.received: list = []

    def next(self):
        """The next streamed envelope (fails the test after TIMEOUT)."""
        env = self.stream.read(timeout=TIMEOUT)
        assert env is not None, "stream ended early"
        self.received.append(env)
        return env

    def until_end(self) -> list:
        """Everything up to the end of the stream; the runtime ends a session's
        stream once the session is terminal. Returns all envelopes received."""
        for env in self.stream.responses(timeout=TIMEOUT):
            self.received.append(env)
        return self.received

    def close(self) -> None:
        self.stream.close()


@pytest.fixture
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    subs: list[Subscriber] = []

    def make(client: MacpClient, session_id: str, after_sequence: int = 0) -> Subscriber:
        s = Subscriber(client, session_id, after_sequence)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()
