# Lookalike: the two commands of the README are `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/datasets/fashion-9k
PYTEST_ARGS ?=

.PHONY: demo loop test unit integration venv up down status lint

$(VENV)/.installed: pyproject.toml scripts/bootstrap
	scripts/bootstrap $(VENV)
	touch $@

venv: $(VENV)/.installed

## demo: stack up, train or reuse a model, ingest the sample catalog, answer queries, write a gallery
demo: venv
	$(BIN)/lookalike demo --data $(DATA)

## loop: after `make demo`, the feedback loop on the running stack, watched: shoppers -> trigger -> retrain
## -> gate -> blue/green switch -> rollback; a table and out/loop-timeline.png (docs/feedback.md#the-loop-watched)
loop: venv
	$(BIN)/lookalike demo --loop --data $(DATA)

## test: unit tests (no servers), integration tests on a real Kafka broker and Redis server, and
## the shopper's page in Debian's chromium (tests/integration/test_gateway.py)
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/python -m pytest tests/unit tests/model $(PYTEST_ARGS)

integration: venv
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

up: venv
	$(BIN)/lookalike stack up
	$(BIN)/lookalike topics create

down:
	-$(BIN)/lookalike services down
	-$(BIN)/lookalike stack down

status: venv
	$(BIN)/lookalike stack status
	$(BIN)/lookalike services status
	$(BIN)/lookalike status

lint: venv
	$(BIN)/ruff check control lookalike producers workers indexer training feedback benchmarks gateway tests
