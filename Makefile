# maglev-lb: `make test` installs everything it needs on a fresh Debian machine (as root) and
# runs the whole suite; `make demo` runs the lab demo.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# System packages a fresh Debian 12 (minbase + make, git, python3) lacks, installed without
# recommends, so each one is named here:
#   python3-venv python3-dev gcc libc6-dev  the venv, and the C extension node._maglev
#   clang llvm libbpf-dev linux-libc-dev    the BPF objects (asm/types.h is in linux-libc-dev)
#   bpftool iproute2 ethtool tcpdump iputils-ping procps  tools the node, the lab and tests drive
#   frr                                     the lab's router and the node's bfdd
#   util-linux                              setpriv (bfdd as user frr), unshare, prlimit
#   systemd                                 systemd-analyze verify of configs/maglev-node.service
#   openssl curl ca-certificates            TLS health-probe tests; curl for the lab's examples
#   prometheus chromium                     promtool/Prometheus and the status page tests
#   etcd-server etcd-client                 the fleet's store (config_source: etcd), the lab's cluster
APT_PACKAGES := python3-venv python3-dev gcc libc6-dev clang llvm libbpf-dev linux-libc-dev \
  bpftool iproute2 ethtool tcpdump iputils-ping procps frr util-linux systemd openssl curl ca-certificates \
  prometheus chromium etcd-server etcd-client

.PHONY: all deps system-deps python-deps test unit integration e2e demo bench bpf fuzz clean

all: deps

deps: system-deps python-deps

# Installs only what is missing, so a provisioned machine pays nothing.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing system packages:$$missing (run as root, or apt-get install them)"; exit 1; fi; \
	  echo "installing system packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

python-deps: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py node/_maglev.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

bpf: deps
	$(PY) -m node.forwarder.build

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

unit: python-deps
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: deps
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: deps
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

# The forwarder's differential test (program vs model) on many more random frames than
# `make test` sends, from a fresh seed each run (FRAMES=..., SEED=... to choose); a failure names
# the seed and the frame, so `make fuzz SEED=n` replays it.
FRAMES ?= 2000000
fuzz: deps
	@seed=$${SEED:-$$(date +%s)}; echo "fuzz: $(FRAMES) frames per conntrack design, seed $$seed"; \
	MAGLEV_DIFF_FRAMES=$(FRAMES) MAGLEV_DIFF_SEED=$$seed $(PY) -m pytest -q -p no:cacheprovider \
	  tests/integration/test_forwarder_diff.py $(PYTEST_ARGS)

demo: deps
	$(VENV)/bin/maglev lab demo

bench: deps
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf build *.egg-info node/forwarder/bpf/*.o .pytest_cache
