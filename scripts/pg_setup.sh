# Sourced by scripts/test: install Debian's PostgreSQL server when missing, for the PostgreSQL store
# tests (tests/conftest.py starts a throwaway server from /usr/lib/postgresql/*/bin on a loopback port,
# as user postgres when run as root). Without root or apt-get those tests are skipped, except in CI.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test: installing Debian's postgresql for the PostgreSQL store tests" >&2
        # policy-rc.d 101: the package must not start its own cluster (on port 5432); the tests start theirs
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d.fishim && chmod +x /usr/sbin/policy-rc.d.fishim
        if [ ! -e /usr/sbin/policy-rc.d ]; then ln -s /usr/sbin/policy-rc.d.fishim /usr/sbin/policy-rc.d; fi
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
            >/tmp/fishim-apt-pg.log 2>&1 || echo "scripts/test: postgresql install failed (see /tmp/fishim-apt-pg.log)" >&2
        if [ "$(readlink /usr/sbin/policy-rc.d 2>/dev/null)" = /usr/sbin/policy-rc.d.fishim ]; then rm -f /usr/sbin/policy-rc.d; fi
        rm -f /usr/sbin/policy-rc.d.fishim
    else
        echo "scripts/test: postgresql missing and cannot be installed here; its tests will be skipped" >&2
    fi
fi
