# Sluiceway developer commands. `make run` and `make test` install what they need first.
PYTHON ?= python3
STAMP := .sluice/.installed-$(shell cat pyproject.toml deploy/local/apt-packages.txt deploy/local/kafka/pom.xml | sha1sum | cut -c1-12)
COMPOSE ?= docker compose -f deploy/docker-compose.yml
PYTEST_ARGS ?=

.PHONY: install run test bench soak faults-cluster lint format schemas up down clean

install: $(STAMP)

$(STAMP): pyproject.toml deploy/local/apt-packages.txt deploy/local/install.sh deploy/local/kafka/pom.xml
	PYTHON=$(PYTHON) bash deploy/local/install.sh
	mkdir -p .sluice && rm -f .sluice/.installed-* && touch $@

run: install ## the whole system on the local cluster with demo traffic and a live view
	$(PYTHON) -m services.cli demo

test: install ## the whole suite against a private local cluster started by the tests
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: install ## benchmarks: prints a table, writes .bench/results.json
	$(PYTHON) -m tests.bench

SOAK_SECONDS ?= 600
SOAK_RATE ?= 50
soak: install ## every service under steady load (SOAK_SECONDS, SOAK_RATE); not part of CI
	$(PYTHON) -m tests.soak --seconds $(SOAK_SECONDS) --rate $(SOAK_RATE)

FAULTS_WINDOW_S ?= 60
FAULTS_LOAD_SCALE ?= 1
faults-cluster: install ## broker loss on a three-broker cluster under load (not in make test; FAULTS_WINDOW_S, FAULTS_LOAD_SCALE)
	SLUICE_FAULTS_WINDOW_S=$(FAULTS_WINDOW_S) SLUICE_FAULTS_LOAD_SCALE=$(FAULTS_LOAD_SCALE) \
		$(PYTHON) -m pytest -q -s -m cluster_faults tests/faults/test_cluster_broker_loss.py

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: install
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

schemas: install ## export the JSON Schemas of every message to schemas/json/
	$(PYTHON) -m schemas.export

up: ## the docker-compose dev cluster (needs a Docker engine)
	$(COMPOSE) up -d

down:
	$(COMPOSE) down

clean:
	$(PYTHON) -m services.cli dev down --wipe || true
