#!/usr/bin/env bash
# Slowloris check (issue 10, point 3): starts the release binary under an open-file limit
# of 256 (soft; hard 512), opens 1,100 connections that each send half a request head and
# then nothing, and checks that
#   - the service raises its soft open-file limit to the hard one (512), logs both, and
#     lowers server.max_connections (1024) to fit (384),
#   - while they are held, /health is answered or refused at once, never left hanging,
#   - the service never runs out of file descriptors ("Too many open files"),
#   - after server.header_read_timeout_ms (2 s here) the half-sent connections are closed
#     and /health answers 200 again.
# Usage: scripts/slowloris-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin ti-scheduler
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
(
  ulimit -Sn 256
  ulimit -Hn 512
  export TI_SCHEDULER__SERVER__HEADER_READ_TIMEOUT_MS=2000 NO_COLOR=1
  exec target/release/ti-scheduler serve --bind "127.0.0.1:$port" --db "$dir/check.db" >"$dir/log" 2>&1
) &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
python3 - "$port" <<'PY'
import socket, sys, time, urllib.request
port = int(sys.argv[1])
def health(timeout=5):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as r:
            return r.status
    except Exception as e:
        return type(e).__name__
for _ in range(100):
    if health(1) == 200: break
    time.sleep(0.1)
else:
    sys.exit("the service did not start")
socks = []
for i in range(1100):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    socks.append(s)
started = time.time()
during = health(5)
waited = time.time() - started
print(f"1100 connections sent half a request head; /health during the flood: {during} after {waited:.2f} s")
assert waited < 4, "a request hung during the flood"
time.sleep(3)
closed = 0
for s in socks:
    s.settimeout(0.5)
    try:
        if s.recv(1024) == b"": closed += 1
    except ConnectionResetError:
        closed += 1
    except socket.timeout:
        pass
print(f"after the header-read timeout: {closed} of 1100 closed by the server")
after = health(5)
print(f"/health afterwards: {after}")
assert closed == 1100 and after == 200
PY
if ! grep -E "open-file limit|max_connections lowered" "$dir/log"; then
  echo "FAILED: the service did not log its open-file limit"; exit 1
fi
if grep -q "Too many open files" "$dir/log"; then
  echo "FAILED: the service ran out of file descriptors"; exit 1
fi
echo "slowloris check passed"
