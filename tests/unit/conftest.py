"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import falcon
import falcon.testing
import pytest

from service.api import create_app
from service.manager import SandboxManager
from tests.unit.agent_harness import AgentProcess
from tests.unit.api_helpers import A
from tests.unit.fakes import FakeEngine, fake_manager, make_config


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


# The real manager over a fake engine (tests/unit/fakes.py). A module changes the service's settings by defining
# its own `service_overrides` (spec [service] keys), and the template's warm state by its own `warm_namespace`.


@pytest.fixture
def service_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
def warm_namespace() -> dict[str, Any]:
    return {}


@pytest.fixture
def config(tmp_path, service_overrides):
    return make_config(tmp_path, **service_overrides)


@pytest.fixture
def fake(config, warm_namespace) -> Iterator[tuple[SandboxManager, FakeEngine]]:
    manager, engine = fake_manager(config, warm_namespace)
    yield manager, engine
    manager.close()


@pytest.fixture
def manager(fake) -> SandboxManager:
    return fake[0]


@pytest.fixture
def engine(fake) -> FakeEngine:
    return fake[1]


# The API app around that manager, and one sandbox of key A.


@pytest.fixture
def app(config, manager) -> falcon.App:
    return create_app(config, manager)


@pytest.fixture
def client(app) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(app)


@pytest.fixture
def sandbox_id(client) -> str:
    return client.simulate_post("/v1/sandboxes", json={}, headers=A).json["id"]
