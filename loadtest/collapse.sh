#!/usr/bin/env bash
# Collapsed forwarding under a stampede: kept as a name for `bash loadtest/run.sh stampede --peers`,
# the one way to run it (loadtest/k6/stampede.js; the Python-client version of reports before
# 2026-11-30 lives in git history).
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" stampede --peers "$@"
