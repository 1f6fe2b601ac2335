# Sourced by scripts/run and scripts/test (after _setup.sh): what the web pages need.
# - mqtt.js (npm package `mqtt`) into fishim/web/node_modules, from the npm registry, never committed;
#   the http listener serves its browser bundle (dist/mqtt.min.js) to the pages.
# - for scripts/test only: Debian's chromium and chromium-driver for the headless browser tests
#   (installed as root when missing; the tests skip with a reason when they cannot be had).
WEB="$ROOT/fishim/web"
if [ ! -f "$WEB/node_modules/mqtt/dist/mqtt.min.js" ] || [ "$WEB/package-lock.json" -nt "$WEB/node_modules/.package-lock.json" ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "web_setup: installing mqtt.js from the npm registry" >&2
        (cd "$WEB" && npm ci --no-audit --no-fund --silent) >/tmp/fishim-npm.log 2>&1 \
            || echo "web_setup: npm ci failed (see /tmp/fishim-npm.log); the web pages will say mqtt.js is missing" >&2
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "web_setup: installing Debian's npm, then mqtt.js from the npm registry" >&2
        (apt-get -o DPkg::Lock::Timeout=600 update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq npm \
            && cd "$WEB" && npm ci --no-audit --no-fund --silent) >/tmp/fishim-npm.log 2>&1 \
            || echo "web_setup: npm install failed (see /tmp/fishim-npm.log); the web pages will say mqtt.js is missing" >&2
    else
        echo "web_setup: npm missing; the web pages need mqtt.js (apt-get install npm, then rerun)" >&2
    fi
fi
if [ "${1:-}" = test ] && { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "web_setup: installing Debian's chromium and chromium-driver for the browser tests" >&2
        (apt-get -o DPkg::Lock::Timeout=600 update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq chromium chromium-driver) \
            >/tmp/fishim-apt-chromium.log 2>&1 \
            || echo "web_setup: chromium install failed (see /tmp/fishim-apt-chromium.log); browser tests will skip" >&2
    else
        echo "web_setup: chromium missing and cannot be installed here; browser tests will skip" >&2
    fi
fi
