# aurae-py: two commands do all the set-up on a fresh machine (as root):
#   make demo   install everything, make a dev PKI, start auraed, run an example against it
#   make test   install everything, check the generated code, run the test suite
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install demo test check generate bench bench-quick

install:
	@./scripts/install.sh

demo: install
	@./scripts/demo.sh

test: install
	aurae-codegen --check
	ruff check aurae_sdk aurae_cli auraed codegen tests bench
	python -m mypy --strict aurae_sdk aurae_cli auraed codegen bench
	pytest

check: install
	aurae-codegen --check

generate: install
	aurae-codegen

bench: install
	python -m bench

bench-quick: install
	python -m bench --quick
