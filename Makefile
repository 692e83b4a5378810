# Every target does its own set-up on a fresh machine: Debian test clients, .venv, the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_PACKAGES := libnbd-bin nbdkit qemu-utils fio e2fsprogs fuse3 util-linux openssl snmptrapd chromium libiscsi-bin tgt
# A command each package provides; apt runs only when one is missing.
DEB_COMMANDS := nbdinfo nbdcopy nbdfuse nbdkit qemu-img qemu-io fio mkfs.ext4 e2fsck losetup openssl snmptrapd chromium iscsi-ls tgtd

.PHONY: all demo test lint typecheck unit bench deb venv clean

all: test

deb:
	@missing=""; for c in $(DEB_COMMANDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages (missing:$$missing)"; \
		if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/blockmirror demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test: deb $(STAMP) lint typecheck
	$(BIN)/pytest -q

bench: deb $(STAMP)
	$(BIN)/python benchmarks/bench_export.py

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
