# kubetune: the two commands a newcomer needs are `make quickstart` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= $(HOME)/.cache/kubetune/venv
PY := $(VENV)/bin/python
export KUBETUNE_VENV := $(VENV)
# Recipes and the scripts they call find the venv's tools (kubetune, pytest, ruff) on PATH.
export PATH := $(VENV)/bin:$(PATH)
PYTEST_ARGS ?= --durations=30

.PHONY: help setup quickstart test test-unit test-integration test-cluster lint fmt typecheck \
        generate check-generated tools system-deps images cluster-up cluster-down demo-cluster \
        bench bench-quick clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: ## create/reuse the Python env (~/.cache/kubetune/venv) with kubetune[operator,trainer,dev]
	@bash scripts/setup-python.sh

quickstart: setup ## offline demo: pre-train a tiny base model, fine-tune it on tldr-pages, evaluate, report
	$(PY) -m kubetune.cli run examples/quickstart-base.yaml --no-progress
	$(PY) -m kubetune.cli run examples/quickstart.yaml
	@echo "report: runs/quickstart/report/report.md (and report.html)"

test: setup system-deps tools images lint ## everything CI runs: lint, types, generated files, all tests (two streams at once)
	PY=$(PY) bash scripts/run-tests.sh $(PYTEST_ARGS)

test-unit: setup ## pure unit tests (no cluster, no training)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup images ## stages on real text with tiny models, real S3 (moto server)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-cluster: setup system-deps tools images ## real control planes and real nodes (kubelet + containerd), S3, Prometheus, Kueue
	$(PY) -m pytest tests/cluster $(PYTEST_ARGS)

lint: setup check-generated ## ruff + mypy + generated files up to date
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check core trainer operator tests bench
	$(VENV)/bin/mypy

fmt: setup ## format the code
	$(VENV)/bin/ruff format core trainer operator tests bench
	$(VENV)/bin/ruff check --fix .

generate: setup ## regenerate crds/, the chart's generated templates and the images' dependency lists
	$(PY) -m kubetune.crd
	$(PY) scripts/image_requirements.py
	@if [ -f operator/kubetune_operator/rbac.py ]; then $(PY) -m kubetune_operator.rbac --write-chart; fi

check-generated: setup ## fail if generated files drifted from the schema or pyproject.toml
	$(PY) -m kubetune.crd --check
	$(PY) scripts/image_requirements.py --check

system-deps: ## Debian packages the tests need (prometheus, lua, buildah/podman, runc, CNI plugins, iptables)
	@bash scripts/install-system-deps.sh

tools: ## build/reuse kube-apiserver, etcd, ... helm, kubeconform (cached in ~/.cache/kubetune/tools)
	@bash scripts/build-tools.sh

images: ## build/reuse the operator and trainer images with buildah (localhost/kubetune/*, docs/images.md)
	@bash scripts/build-images.sh

cluster-up: setup system-deps tools ## start the test cluster by hand (root): control plane, a real node (kubelet + containerd), S3
	cd tests && $(PY) -m harness up

cluster-down: ## stop the test cluster and remove what its node made (mounts, cgroups, bridge, iptables rules)
	cd tests && $(PY) -m harness down

demo-cluster: setup system-deps tools images ## the README's cluster walkthrough, all in containers (helm chart, trainer image); exit 0 on Succeeded
	bash scripts/demo-cluster.sh

bench: setup ## full benchmarks (bench/results/latest.json, bench/RESULTS.md)
	$(PY) -m bench.run --full

bench-quick: setup ## a few-minute benchmark run
	$(PY) -m bench.run --quick

clean: ## remove local run outputs
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
