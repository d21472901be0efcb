# Makefile fragment for the infra checks; the main Makefile does `include infra/infra.mk`.
#   make infra-venv    create .venv-infra with checkov + pycep-parser (requirements-infra.txt)
#   make infra-check   run checkov on infra/ the way tests/test_infra.py does
# .venv-infra is separate from the app's .venv: checkov's dependencies must not disturb the app's.

INFRA_PYTHON ?= python3.11
INFRA_VENV ?= .venv-infra

.PHONY: infra-venv infra-check

infra-venv: $(INFRA_VENV)/.installed

$(INFRA_VENV)/.installed: requirements-infra.txt
	test -x $(INFRA_VENV)/bin/python || $(INFRA_PYTHON) -m venv $(INFRA_VENV)
	@# keep git from ever seeing the venv, whatever the repo's .gitignore says
	printf '*\n' > $(INFRA_VENV)/.gitignore
	$(INFRA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-infra.txt
	touch $@

infra-check: infra-venv
	$(INFRA_VENV)/bin/checkov -d infra --framework bicep --skip-download --compact --quiet
