#!/usr/bin/env bash
# loadtest/lib/apt-install.sh PACKAGE...: installs Debian packages with apt-get, quietly, as
# .ci/run and the test and load scripts need them (as root). Their services are kept from starting: a
# policy-rc.d that exits 101 is in place while apt runs, and removed after if it was not there
# before. One apt at a time across the scripts: each takes /tmp/imgedge-apt.lock (tests/run.sh
# runs the Supabase and operator steps side by side). `apt-get update` runs only when the
# install fails (a fresh container has no package lists); the second attempt's errors are shown.
#
# Exit status 0 when installed; otherwise 1, with a line on stderr saying why.
set -uo pipefail
me=apt-install.sh
(($#)) || { echo "$me: no packages given" >&2; exit 2; }
((EUID == 0)) || { echo "$me: installing $* needs root" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "$me: no apt-get to install $* with" >&2; exit 1; }
exec 9>/tmp/imgedge-apt.lock
flock -w 900 9 || { echo "$me: another apt-get held /tmp/imgedge-apt.lock for 15 minutes" >&2; exit 1; }

policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" || exit 1
  trap 'rm -f "$policy"' EXIT
fi
install() { DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
install "$@" 2>/dev/null || { timeout 300 apt-get update -qq >/dev/null && install "$@"; } ||
  { echo "$me: apt-get install $* failed" >&2; exit 1; }
