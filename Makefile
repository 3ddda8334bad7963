# openaigw: `make run` starts the gateway, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
FLOOR := .venv-floor
# Debian bookworm's own packages: the oldest versions we support.
FLOOR_DEBS := python3-twisted python3-openssl python3-service-identity \
	python3-zope.interface python3-prometheus-client python3-pytest python3-treq python3-venv \
	python3-hiredis
# What the tests run against: Debian's redis-server (shared state).
TEST_DEBS := redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-latest test-floor test-debs demo check bench clean

$(VENV)/.installed: setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-test.txt .
	touch $@

$(FLOOR)/.installed: requirements-test.txt
	dpkg-query -W $(FLOOR_DEBS) >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(FLOOR_DEBS) >/dev/null; }
	/usr/bin/python3 -m venv --system-site-packages $(FLOOR)
	$(FLOOR)/bin/pip install -q openai
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/twistd --nodaemon --pidfile= openaigw -c etc/gw.ini

check: $(VENV)/.installed
	$(VENV)/bin/twistd openaigw -c etc/gw.ini --check

test: test-latest test-floor

test-debs:
	@dpkg-query -W $(TEST_DEBS) >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(TEST_DEBS) >/dev/null; }

test-latest: $(VENV)/.installed test-debs
	@$(VENV)/bin/python -c 'import twisted, OpenSSL; print("latest: Twisted", twisted.__version__, "pyOpenSSL", OpenSSL.__version__)'
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python -m pytest -q tests

test-floor: $(FLOOR)/.installed test-debs
	@$(FLOOR)/bin/python -c 'import twisted, OpenSSL; print("floor: Twisted", twisted.__version__, "pyOpenSSL", OpenSSL.__version__)'
	PYTHONPATH=$(CURDIR) $(FLOOR)/bin/python -m pytest -q -p no:cacheprovider tests

BENCH_DEBS := nginx-light libnginx-mod-http-echo wrk
bench: $(VENV)/.installed test-debs
	dpkg-query -W $(BENCH_DEBS) >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(BENCH_DEBS) >/dev/null; }
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python bench/run.py $(BENCH_ARGS)

demo: $(VENV)/.installed
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python -m openaigw.demo

clean:
	rm -rf $(VENV) $(FLOOR) build *.egg-info .pytest_cache twisted/plugins/dropin.cache

# Debian package (debian/), built in a temporary copy of the tree: `make package` builds
# it (running the suite on Debian's Twisted), checks its contents, lintian and the units,
# and puts the .deb in dist/; `make package-test` also installs it in a booted Debian 12
# container and checks the service there (.ci/package/run --help). Both need root.
.PHONY: package package-test
package:
	bash .ci/package/run --no-boot --out dist

package-test:
	bash .ci/package/run
