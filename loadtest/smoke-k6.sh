#!/usr/bin/env bash
# The k6 smoke test: kept as a name for `bash loadtest/run.sh smoke`, the one way to run it.
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" smoke "$@"
