# The two set-up commands of the README. Each creates .venv on first use.
.PHONY: run test lint venv
PROFILE ?= default

venv:
	@bash scripts/bootstrap.sh

run: venv
	HF_HUB_OFFLINE=1 .venv/bin/sigma run --profile $(PROFILE)

test: venv
	.venv/bin/ruff check src tests
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest

lint: venv
	.venv/bin/ruff check src tests
