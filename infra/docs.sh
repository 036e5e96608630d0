#!/usr/bin/env bash
# Build the docs site into site/: the generated pages (configuration and CLI references,
# benchmark tables and plots from bench/results), then mkdocs with --strict, so that a broken
# link or a missing reference fails the build. `bash infra/docs.sh serve` serves it instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash infra/install.sh
.venv/bin/python infra/docs_pages.py
if [[ "${1:-build}" == "serve" ]]; then
    NO_MKDOCS_2_WARNING=1 exec .venv/bin/mkdocs serve
fi
# Not --quiet: strict mode counts the warnings it logs, and --quiet does not log them.
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict
echo "docs: site/index.html"
