#!/bin/sh
# The main job: a development PKI, a real auraed, and example scripts driving it.
# Everything lives in .dev/ in the checkout; the daemon is stopped at the end.
set -eu
cd "$(dirname "$0")/.."
PATH="$(pwd)/.venv/bin:$PATH"
export PATH

dev="$(pwd)/.dev"
socket="$dev/run/aurae.sock"
mkdir -p "$dev"
if [ ! -f "$dev/pki/config" ]; then
    aurae-py pki init "$dev/pki" --socket "$socket" >/dev/null
    echo "demo: development PKI written to $dev/pki"
fi
export AURAE_CONFIG="$dev/pki/config"

auraed --socket "$socket" \
    --ca-crt "$dev/pki/ca.crt" --server-crt "$dev/pki/_signed.server.crt" --server-key "$dev/pki/server.key" \
    --runtime-dir "$dev/run" --library-dir "$dev/lib" --cgroup-root aurae-demo \
    >"$dev/auraed.log" 2>&1 &
daemon=$!
stop_daemon() {
    if kill -0 "$daemon" 2>/dev/null; then
        kill -TERM "$daemon"
        wait "$daemon" || true
    fi
}
trap stop_daemon EXIT INT TERM

tries=0
until aurae-py health check >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ] || ! kill -0 "$daemon" 2>/dev/null; then
        echo "demo: auraed did not come up; its log:" >&2
        cat "$dev/auraed.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "demo: auraed is serving on $socket (log: $dev/auraed.log)"

for example in discovery health cpu_quota memory_limit nested_cells isolation output async_fanout; do
    echo
    echo "== examples/$example.py"
    "./examples/$example.py"
done

echo
stop_daemon
trap - EXIT INT TERM
if find /sys/fs/cgroup -maxdepth 2 -name aurae-demo | grep -q .; then
    echo "demo: cgroups were left behind" >&2
    exit 1
fi
echo "demo: auraed stopped and left nothing behind."
echo "Next: . .venv/bin/activate; export AURAE_CONFIG=$dev/pki/config; start auraed as above and try 'aurae-py' (the REPL)."
