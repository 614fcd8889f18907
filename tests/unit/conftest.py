"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.unit.agent_harness import AgentProcess


@pytest.fixture
def agent_factory() -> Iterator[Callable[..., AgentProcess]]:
    """Start guest agents on this host (`--stdio`, own session); all are stopped and their processes killed
    at the end of the test, whatever happened in it. The hello event is consumed already."""
    started: list[AgentProcess] = []

    def start(*args: str, **kwargs: object) -> AgentProcess:
        agent = AgentProcess.start(*args, **kwargs)  # type: ignore[arg-type]
        started.append(agent)
        agent.hello()
        return agent

    yield start
    for agent in started:
        agent.close()


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    """One guest agent on this host, ready for requests."""
    return agent_factory()
