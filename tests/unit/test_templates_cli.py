"""`appliance templates publish|list|rm` on a node's registry: a key's named snapshot becomes a template every key
creates from (through the real API over a fake engine), and unpublishing it frees its memory once unused."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from appliance.cli import main

from .api_helpers import A, B, assert_error
from .fakes import KEY_A, key_id


@pytest.fixture
def templates_cli(config, monkeypatch):
    monkeypatch.setenv("APPLIANCE_PATHS__STATE_DIR", str(config.state_dir))
    monkeypatch.setenv("APPLIANCE_PATHS__RUN_DIR", str(config.run_dir))

    def run(*argv: str):
        return CliRunner().invoke(main, ["templates", *argv])

    return run


def test_a_published_snapshot_is_a_template_for_every_key(templates_cli, client, sandbox_id, config, manager):
    assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/exec", json={"code": "x = 3"}, headers=A).status_code \
        == 200
    assert client.simulate_post(f"/v1/sandboxes/{sandbox_id}/snapshots", json={"name": "base"},
                                headers=A).status_code == 201
    owner = key_id(config, KEY_A)
    published = templates_cli("publish", "base", "--key-id", owner, "--as", "team")
    assert published.exit_code == 0, published.output
    listed = templates_cli("list")
    assert listed.exit_code == 0 and "team" in listed.output and "base" not in listed.output
    again = templates_cli("publish", "base", "--key-id", owner, "--as", "team")
    assert again.exit_code == 1 and "exists" in again.output and "Traceback" not in again.output

    made = client.simulate_post("/v1/sandboxes", json={"template": "team"}, headers=B)
    assert made.status_code == 201, made.text
    ran = client.simulate_post(f"/v1/sandboxes/{made.json['id']}/exec", json={"code": "x"}, headers=B)
    assert ran.json["text"] == "3"

    # The owner deletes its snapshot: the template stays (it shares the files)
    assert client.simulate_delete("/v1/snapshots/base", headers=A).status_code == 204
    template_dir = config.templates_dir / manager.registry.snapshots("")[0].template_id
    assert client.simulate_post("/v1/sandboxes", json={"template": "team"}, headers=A).status_code == 201

    removed = templates_cli("rm", "team")
    assert removed.exit_code == 0, removed.output
    assert_error(client.simulate_post("/v1/sandboxes", json={"template": "team"}, headers=A), 404, "not_found")
    assert template_dir.is_dir()  # sandboxes made from it still map it
    for sandbox in manager.registry.list():
        if sandbox.template_id == template_dir.name:
            manager._destroy(sandbox)
    assert not template_dir.exists()


@pytest.mark.parametrize("argv", [["publish", "nope", "--key-id", "k-1"], ["rm", "nope"], ["publish", "../x",
                                                                                          "--key-id", "k"]])
def test_errors_are_one_line(templates_cli, client, argv):
    client.simulate_get("/v1/sandboxes", headers=A)  # the registry exists
    result = templates_cli(*argv)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
