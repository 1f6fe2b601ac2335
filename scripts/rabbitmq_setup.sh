# Sourced by scripts/test: install Debian's rabbitmq-server when missing, for the clustered-broker test
# (tests/test_rabbitmq_cluster.py starts a 2-node cluster on loopback ports in a temp dir). The
# package's own service is kept from starting (policy-rc.d) so nothing listens beyond the tests' nodes.
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test: installing Debian's rabbitmq-server for the cluster test" >&2
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d.fishim && chmod +x /usr/sbin/policy-rc.d.fishim
        if [ ! -e /usr/sbin/policy-rc.d ]; then ln -s /usr/sbin/policy-rc.d.fishim /usr/sbin/policy-rc.d; fi
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            rabbitmq-server) >/tmp/fishim-apt-rabbitmq.log 2>&1 \
            || echo "scripts/test: rabbitmq-server install failed (see /tmp/fishim-apt-rabbitmq.log)" >&2
        if [ "$(readlink /usr/sbin/policy-rc.d 2>/dev/null)" = /usr/sbin/policy-rc.d.fishim ]; then rm -f /usr/sbin/policy-rc.d; fi
        rm -f /usr/sbin/policy-rc.d.fishim
    else
        echo "scripts/test: rabbitmq-server missing and cannot be installed here; its test will be skipped" >&2
    fi
fi
