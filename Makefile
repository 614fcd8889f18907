# The two commands a user needs are at the top of README.md: `make demo` and `make test`.
# Both install what they need (Debian packages, a venv in .venv/) and are safe to run again.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APPLIANCE := $(VENV)/bin/appliance
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# Host packages: QEMU to run sandboxes; the rest to build the guest image.
# systemd-container, openssh-client: the provisioning suite's test hosts; bubblewrap: the jail around each QEMU.
APT_PACKAGES := python3 python3-venv qemu-system-x86 qemu-utils mmdebstrap e2fsprogs ca-certificates \
	systemd-container openssh-client bubblewrap \
	grub-pc-bin grub-efi-amd64-bin mtools dosfstools fdisk ovmf
# The last line: `appliance build host` (GRUB for BIOS and UEFI, FAT partitions without mounting, GPT on a file)
# and its boot tests (OVMF is the UEFI firmware; SeaBIOS comes with QEMU).

.PHONY: demo test setup host-packages guest-image host-image lint unit integration provisioning bench clean

demo: setup guest-image
	$(APPLIANCE) doctor
	$(APPLIANCE) run -c 'import pandas, sklearn, platform; print("pandas", pandas.__version__, "sklearn", sklearn.__version__, "on", platform.node())'
	examples/demo.sh

test: setup guest-image lint
	$(VENV)/bin/pytest -q

setup: host-packages $(VENV)/.installed

host-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
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

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
