#!/usr/bin/env bash
# The flash crowd: kept as a name for `bash loadtest/run.sh flash-crowd --peers`, the one way to
# run it (loadtest/k6/flash-crowd.js; the wrk version of reports before 2026-11-30 lives in git
# history).
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" flash-crowd --peers "$@"
