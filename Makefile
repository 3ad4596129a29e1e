# corral: set-up, run and test. Only python3 and make are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/corral.toml
# mypy cannot follow the editable install's import hook, so it checks the package
# through symlinks laid out the way [tool.setuptools.package-dir] maps the folders.
TYPECHECK := build/typecheck
SUBPACKAGES := broker supervisor workers config
# The suite's tests mostly wait on real processes: six at a time on 2 cores
# (with corral commands forked from tests/zygote.py the suite needs 41% less
# CPU, so four left it waiting: 256 s against 234 s; eight, 229 s), and work
# stealing keeps the long tests from ending the run on one process.
TEST_PROCESSES ?= 6
# The suite starts a few hundred daemons and CLI processes: each would compile
# every module again where the environment turns bytecode caching off.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test typecheck typecheck-tree soak lint bench bench-peers docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --no-compile: a package's bytecode is written on its first import instead (most
# of Django and the type stubs are never imported), which halves the install.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/corral run -c $(CONFIG)

# mypy runs beside pytest (the suite mostly waits on processes, so a core is often
# free); its verdict and output come after the suite's, and either failing fails.
test: $(STAMP) typecheck-tree
	$(BIN)/ruff check .
	@mkdir -p build
	@$(BIN)/mypy >build/mypy.out 2>&1 & typecheck=$$!; \
	$(BIN)/pytest -q -m "not soak" -p no:cacheprovider -n $(TEST_PROCESSES) --dist worksteal; \
	suite=$$?; wait $$typecheck; types=$$?; cat build/mypy.out; \
	[ $$suite -eq 0 ] && [ $$types -eq 0 ]

typecheck: $(STAMP) typecheck-tree
	$(BIN)/mypy

# Links are only added (and dangling ones dropped), so a check running at the same time
# never sees the tree half-built. (tests/test_typed_enqueue.py checks a snippet through it.)
typecheck-tree:
	mkdir -p $(TYPECHECK)/corral
	find $(TYPECHECK)/corral -maxdepth 1 -xtype l -delete
	for src in $(wildcard corral/*.py) corral/dashboard $(SUBPACKAGES); do \
		link=$(TYPECHECK)/corral/$${src#corral/}; \
		[ -L $$link ] || ln -s ../../../$$src $$link; \
	done

# The full profile of every fault test (tests/faults/, marker `soak`; the fast
# profile of the same tests runs in `make test`), one test at a time: the
# figures are for a machine doing nothing else. Counts come from CORRAL_SOAK_*
# (docs/RELIABILITY.md); SOAK_ARGS adds pytest arguments, e.g. SOAK_ARGS="-k broker_kill".
SOAK_ARGS ?=
soak: $(STAMP)
	CORRAL_TEST_EXEC=1 $(BIN)/pytest -q -m soak -p no:cacheprovider -rxXs $(SOAK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# docs/CONFIG.md is written from config/schema.py (tests/test_config_reference.py
# fails while the two differ).
docs: $(STAMP)
	$(BIN)/python -m corral.config.reference docs/CONFIG.md

bench: $(STAMP)
	$(BIN)/python bench/run.py

# corral side by side with RQ, Dramatiq, Huey, Celery and arq (issue 15): the
# script makes their venv (bench/.peers-venv, from bench/peers/requirements.txt)
# and a redis-server of its own (apt-get installs Debian's redis-server when it
# is missing; without it the peers are skipped). PEERS_ARGS="--quick" for a
# smoke run, "--reps N", "--peer Huey" ... (bench/peers/run.py --help).
PEERS_ARGS ?=
bench-peers: $(STAMP)
	$(BIN)/python bench/peers/run.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
