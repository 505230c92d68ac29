# tortie: `make demo` and `make test` are all a newcomer needs (as root, on Debian 12).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := ipset iptables etcd-server etcd-client bird2 frr nftables python3-nftables iproute2 iputils-ping \
	containernetworking-plugins tcpdump procps psmisc
# Debian's libnftables binding (python3-nftables) lives outside any virtualenv; the venv
# gets a symlink of just that package (not the whole dist-packages directory).
DEBIAN_PY := /usr/lib/python3/dist-packages

.PHONY: install deps venv test test-fast bench bench-scale lint demo clean

install: deps venv

# Debian packages: etcd, the top-of-rack routers (BIRD2, FRR), nftables and its Python
# binding, the reference CNI plugins.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	ln -sfn $(DEBIAN_PY)/nftables "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nftables"
	$(PY) -c 'from nftables import Nftables'
	touch $@

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# Each benchmark prints its figures next to the reference measured in the same run; a
# missed target is reported (exit 1) but the others still run. The big labs (up to 100
# nodes, ~30 min) run apart: `make bench-scale`.
BENCH_LONG := bench/scale/claims.py
bench: install
	@rc=0; for b in $(filter-out $(BENCH_LONG),$(wildcard bench/*/*.py)); do echo "== $$b"; $(PY) $$b || rc=1; done; exit $$rc

bench-scale: install
	@rc=0; for b in $(BENCH_LONG); do echo "== $$b"; $(PY) $$b || rc=1; done; exit $$rc

lint: venv
	$(VENV)/bin/ruff check .

demo: install
	$(PY) -m tortie.lab.demo

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
