# The two commands a user needs are at the top of README.md: `make demo` and `make test`.
# Both install what they need (Debian packages, a venv in .venv/) and are safe to run again.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APPLIANCE := $(VENV)/bin/appliance
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# Host packages: every program the code runs, and the few data packages it reads (firmware, GRUB modules, keys),
# come from one table, appliance/host_tools.py. It runs with the system python3, so that comes first.
HOST_TOOLS := /usr/bin/python3 -m appliance.host_tools
APT_INSTALL := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends

.PHONY: demo test setup host-packages guest-image host-image lint unit integration provisioning bench fuzz load test-snapshots-long clean chaos soak

demo: setup guest-image
	$(APPLIANCE) doctor
	$(APPLIANCE) run -c 'import pandas, sklearn, platform; print("pandas", pandas.__version__, "sklearn", sklearn.__version__, "on", platform.node())'
	examples/demo.sh

test: setup guest-image lint
	$(VENV)/bin/pytest -q

setup: host-packages $(VENV)/.installed

# QEMU >= 10 (host_tools.MIN_VERSIONS): Debian 13 ships it; on Debian 12 `apt-sources` enables bookworm-backports
# pinned to QEMU's packages only (/etc/apt/preferences.d/appliance-qemu-backports.pref), and an older QEMU counts as
# missing, so it is upgraded. A second run writes nothing and installs nothing.
host-packages:
	@if [ ! -x /usr/bin/python3 ]; then \
		echo "installing Debian packages: python3 python3-venv (the table of the rest is Python)"; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) python3 python3-venv; \
	fi
	@stale=$$($(HOST_TOOLS) apt-sources --check) || exit 1; \
	if [ -n "$$stale" ]; then \
		changed=$$($(SUDO) $(HOST_TOOLS) apt-sources) || exit 1; echo "apt sources written:" $$changed; \
	fi; \
	missing=$$($(HOST_TOOLS) to-install) || exit 1; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && $(APT_INSTALL) $$missing || exit 1; \
		still=$$($(HOST_TOOLS) to-install) || exit 1; \
		if [ -n "$$still" ]; then echo "still missing or too old after apt-get install:" $$still >&2; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@touch $@

guest-image: setup
	$(APPLIANCE) build guest

# A bootable node disk image (see README, "The host image"); the root stage is cached in ~/.cache/appliance.
host-image: setup guest-image
	$(APPLIANCE) build host -o build/node.img

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ansible-lint -q

unit: setup
	$(VENV)/bin/pytest -q -m 'not integration and not provisioning'

integration: setup guest-image
	$(VENV)/bin/pytest -q -m integration

provisioning: setup guest-image
	$(VENV)/bin/pytest -q -m provisioning tests/provisioning

bench: setup guest-image
	$(PY) bench/engine_bench.py
	$(PY) bench/api_bench.py
	$(PY) bench/agent_bench.py

# The long versions of tests/reliability (docs/reliability.md has their figures); `make test` runs the short ones.
fuzz: setup guest-image
	APPLIANCE_FUZZ_EXAMPLES=300 APPLIANCE_FUZZ_SCENARIOS=60 APPLIANCE_FUZZ_MIN_CASES=5000 \
		$(VENV)/bin/pytest -q -s -p no:cacheprovider tests/reliability/test_fuzz.py

load: setup guest-image
	$(PY) bench/load_bench.py

# Named snapshots with 20 sandboxes from one snapshot (`make test` makes 5).
test-snapshots-long: setup guest-image
	APPLIANCE_TEST_SNAPSHOT_COPIES=20 $(VENV)/bin/pytest -q -p no:cacheprovider tests/integration/test_snapshots_live.py

# Faults and soak (tests/reliability/test_faults.py, test_soak.py): `make test` runs the short fault matrix (the soak
# only when APPLIANCE_SOAK_CYCLES is set); these run every fault case (a simulated host reboot too) and 1,000 cycles.
chaos: setup guest-image
	APPLIANCE_CHAOS=full $(VENV)/bin/pytest -q -s -p no:cacheprovider tests/reliability/test_faults.py

soak: setup guest-image
	APPLIANCE_SOAK_CYCLES=1000 $(VENV)/bin/pytest -q -s -p no:cacheprovider tests/reliability/test_soak.py

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
