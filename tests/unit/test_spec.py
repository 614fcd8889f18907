import os
import tomllib
from pathlib import Path

import pytest

from appliance.spec import ApplianceSpec, SpecError, load_spec
from appliance.spec_file import render_spec_toml


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec()
    assert spec.guest.accelerator == "auto"
    assert all("==" in p for p in spec.guest.pip_packages)
    names = {p.split("==")[0] for p in spec.guest.pip_packages}
    assert {"numpy", "pandas", "scikit-learn", "matplotlib", "scipy"} <= names


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    path = write(tmp_path, "[guest]\nvcpus = 2\nmemory_mib = 512\n")
    assert load_spec(path).guest.vcpus == 2
    monkeypatch.setenv("APPLIANCE_GUEST__VCPUS", "3")
    spec = load_spec(path)
    assert (spec.guest.vcpus, spec.guest.memory_mib) == (3, 512)
    spec = load_spec(path, {"guest": {"vcpus": 4}})
    assert (spec.guest.vcpus, spec.guest.memory_mib) == (4, 512)


def test_bad_value_is_one_line_naming_field_file_and_allowed(tmp_path):
    path = write(tmp_path, '[guest]\naccelerator = "fast"\n')
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "guest.accelerator" in message and "'kvm'" in message


def test_unpinned_pip_package_is_refused(tmp_path):
    path = write(tmp_path, '[guest]\npip_packages = ["numpy"]\n')
    with pytest.raises(SpecError, match="not pinned"):
        load_spec(path)


def test_unknown_key_is_refused(tmp_path):
    path = write(tmp_path, "[guest]\nvcpu = 2\n")
    with pytest.raises(SpecError, match=r"guest\.vcpu.*not a known setting"):
        load_spec(path)


def test_toml_syntax_error_is_one_line(tmp_path):
    path = write(tmp_path, "[guest\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.toml")


def test_rendered_spec_has_every_setting_and_loads_back_to_defaults(tmp_path):
    text = render_spec_toml()
    data = tomllib.loads(text)
    for section, model in ApplianceSpec.model_fields.items():
        fields = model.annotation.model_fields
        for name in fields:
            assert name in data[section] or f"# {name} =" in text, f"{section}.{name} missing"
    path = write(tmp_path, text)
    assert load_spec(path).model_dump() == ApplianceSpec().model_dump()


def test_image_hash_ignores_vm_size_but_not_packages():
    base = ApplianceSpec().guest
    assert base.content_hash() == base.model_copy(update={"vcpus": 4, "memory_mib": 4096}).content_hash()
    changed = base.model_copy(update={"apt_packages": ["jq"]})
    assert changed.content_hash() != base.content_hash()


def test_a_service_process_drops_the_keys_from_its_environment_once_read(tmp_path, monkeypatch):
    from service import settings

    monkeypatch.setenv("APPLIANCE_API_KEYS", "k1,k2")
    monkeypatch.setenv("APPLIANCE_METRICS_KEYS", "m1")
    monkeypatch.setenv("APPLIANCE_PATHS__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    config = settings.load_service_config()
    assert config.api_keys == ("k1", "k2") and config.metrics_keys == ("m1",)
    assert "k1" not in repr(config) and "m1" not in repr(config)
    assert "APPLIANCE_API_KEYS" not in os.environ and "APPLIANCE_METRICS_KEYS" not in os.environ
