#!/usr/bin/env bash
# The whole test suite. The tests start the servers they need (broker, MLflow, Ray) once per
# session on free ports and stop them at the end; extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# --durations: the slowest tests in every log, to keep the suite within its time (CI: 40 minutes).
exec .venv/bin/python -m pytest --durations=25 "$@"
