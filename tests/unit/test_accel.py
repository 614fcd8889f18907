import json
import os

import pytest

from service.engine import accel


def never(*_):
    raise AssertionError("must not be called")


def test_tcg_requested_skips_every_probe():
    choice = accel.choose_accelerator("tcg", never, never)
    assert choice.name == "tcg" and "requested" in choice.reason


def test_auto_uses_kvm_when_the_probe_boot_works():
    assert accel.choose_accelerator("auto", lambda: None, lambda: None).name == "kvm"


def test_auto_falls_back_and_says_why():
    choice = accel.choose_accelerator("auto", lambda: "/dev/kvm does not exist", never)
    assert choice.name == "tcg" and "/dev/kvm does not exist" in choice.reason
    choice = accel.choose_accelerator("auto", lambda: None, lambda: "probe guest hung")
    assert choice.name == "tcg" and "probe guest hung" in choice.reason


def test_kvm_requested_but_unusable_is_an_error():
    with pytest.raises(accel.AcceleratorUnavailable, match="hung"):
        accel.choose_accelerator("kvm", lambda: None, lambda: "hung")


def test_missing_device_is_explained(tmp_path):
    assert "does not exist" in accel.kvm_device_problem(tmp_path / "kvm")


def test_choice_is_cached_per_key(tmp_path):
    cache = tmp_path / "accel.json"
    calls = []

    def decide():
        calls.append(1)
        return accel.AcceleratorChoice("tcg", "because")

    first = accel.cached_choice(cache, "image-a", decide)
    second = accel.cached_choice(cache, "image-a", decide)
    assert first == second and len(calls) == 1
    accel.cached_choice(cache, "image-b", decide)
    assert len(calls) == 2


def test_tsc_from_cpuinfo_prefers_nominal_rate():
    cpuinfo = "model name\t: Intel(R) Xeon(R) CPU E5-2690 @ 2.90GHz\ncpu MHz\t\t: 1200.000\n"
    assert accel.host_tsc_khz(cpuinfo) == 2_900_000
    assert accel.host_tsc_khz("model name\t: Intel(R) Xeon(R) Processor\ncpu MHz\t\t: 2600.000\n") == 2_600_000
    assert accel.host_tsc_khz("nothing here") is None


def test_a_cache_file_planted_by_someone_else_is_not_believed(tmp_path):
    cache = tmp_path / "cache.json"
    decided = []

    def decide():
        decided.append(1)
        return accel.AcceleratorChoice("tcg", "probed")

    accel.cached_choice(cache, "image-a", decide)
    key = json.loads(cache.read_text())["key"]
    for planted in ("other owner", "group-writable"):
        cache.unlink()
        cache.write_text(json.dumps({"key": key, "name": "kvm", "reason": "planted"}))
        if planted == "other owner":
            os.chown(cache, 4242, 4242)
        else:
            cache.chmod(0o666)
        assert accel.cached_choice(cache, "image-a", decide).reason == "probed"
    assert len(decided) == 3
