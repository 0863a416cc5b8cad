#!/usr/bin/env bash
# What one plain front-door request costs the scheduler in CPU instructions, counted by
# valgrind's callgrind: the release binary behind two simulated OpenAI-compatible servers
# (`sim-ti --protocol openai`, answering at once), N chat completions from four keep-alive
# clients, counters zeroed after start-up and registration. Unlike a rate or a latency on a
# shared VM, the count repeats to within about 0.5 % from run to run, so it can tell two
# builds apart by a percent or two. It counts the scheduler's user-space instructions only (its
# threads, the writer's SQLite work included; not the kernel's, not the clients' nor the
# servers'). Needs valgrind (Debian: `apt-get install valgrind`), python3 and curl.
# Usage: scripts/instructions-per-request.sh [REQUESTS] [scheduler|relay] [BINARY]
#   REQUESTS  default 2000 (a multiple of 4).
#   relay     counts instead the relay of `measure proxy` that writes the scheduler's record
#             and decides nothing (`measure ceiling-server --mode relay --record scheduler`),
#             the yardstick of the scheduler's own work.
#   BINARY    the service binary (scheduler; default target/release/ti-scheduler, built
#             first), to compare two builds.
# Prints the total and per request, and keeps the profiles (callgrind_annotate reads them).
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-2000}"
what="${2:-scheduler}"
bin="${3:-}"
for tool in valgrind callgrind_control python3 curl; do
  command -v "$tool" > /dev/null || { echo "error: $tool is not installed" >&2; exit 1; }
done
if [ "$((requests % 4))" -ne 0 ] || [ "$requests" -le 0 ]; then
  echo "error: REQUESTS must be a positive multiple of 4, got '$requests'" >&2
  exit 1
fi
case "$what" in
  scheduler | relay) ;;
  *) echo "error: the second argument must be scheduler or relay, got '$what'" >&2; exit 1 ;;
esac
if [ -z "$bin" ]; then
  cargo build --release --bin ti-scheduler
  bin=target/release/ti-scheduler
fi
if [ "$what" = relay ]; then
  measure=$(cargo bench --bench measure --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -1)
  [ -x "$measure" ] || { echo "error: could not build the measure bench" >&2; exit 1; }
fi

dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {
  for _ in $(seq 1 120); do curl -sf "$1" > /dev/null && return 0; sleep 0.5; done
  echo "error: $1 did not answer within 60 s" >&2
  exit 1
}

backends=()
for n in 1 2; do
  port=$(free_port)
  "$bin" sim-ti --protocol openai --model bench --host 127.0.0.1 --port "$port" \
    --parallelism 64 --base-ms 0 --per-output-token-ms 0 --min-completion-share 1 \
    > "$dir/sim-$n.log" 2>&1 &
  pids+=($!)
  backends+=("$port")
done
for backend in "${backends[@]}"; do wait_for "http://127.0.0.1:$backend/v1/models"; done
port=$(free_port)
profile="$dir/callgrind.out"
callgrind=(valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$profile")
base="http://127.0.0.1:$port"
if [ "$what" = scheduler ]; then
  TI_SCHEDULER__DATABASE__PATH="$dir/scheduler.db" TI_SCHEDULER__DATABASE__DURABILITY=full \
    "${callgrind[@]}" "$bin" serve --bind "127.0.0.1:$port" > "$dir/server.log" 2>&1 &
  scheduler=$!
  pids+=("$scheduler")
  wait_for "$base/ready"
  for backend in "${backends[@]}"; do
    curl -sf -X POST "$base/ti/register" -H 'content-type: application/json' \
      -d "{\"host\":\"127.0.0.1\",\"port\":$backend,\"kind\":\"openai\",\"max_concurrency\":64}" > /dev/null
  done
else
  "${callgrind[@]}" "$measure" ceiling-server --mode relay --port "$port" \
    --to "http://127.0.0.1:${backends[0]},http://127.0.0.1:${backends[1]}" \
    --db "$dir/relay.db" --durability full --record scheduler > "$dir/server.log" 2>&1 &
  scheduler=$!
  pids+=("$scheduler")
  # Any answer will do (the relay serves only the OpenAI paths).
  for _ in $(seq 1 120); do curl -s -o /dev/null "$base/" && break; sleep 0.5; done
  curl -s -o /dev/null "$base/" || { echo "error: the relay did not start ($dir/server.log)" >&2; exit 1; }
fi

callgrind_control -z "$scheduler" > /dev/null 2>&1
python3 - "$port" "$requests" << 'PY'
import http.client, json, sys, threading
port, total = int(sys.argv[1]), int(sys.argv[2])
per_client = total // 4
failed = []
def client(k):
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for i in range(per_client):
        body = json.dumps({"model": "bench", "max_tokens": 16, "stream": False,
                           "messages": [{"role": "user", "content": f"Request {k * per_client + i}: say something short."}]})
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            failed.append(response.status)
threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
for t in threads: t.start()
for t in threads: t.join()
if failed:
    sys.exit(f"error: {len(failed)} of {total} requests failed (first status {failed[0]})")
PY
# The outcomes commit after the answers: give the writer time, then dump the counters.
sleep 2
callgrind_control -d "$scheduler" > /dev/null 2>&1
sleep 1
# One dump per thread. The checkpoint thread (store/checkpoint.rs) is left out: it runs on
# the clock, every 20 ms, not per request, and valgrind slows the requests down some
# twenty times, so it would count many times what it costs per request at full speed. It is
# the thread that checkpoints without being the writer (no automatic checkpoint,
# sqlite3_wal_checkpoint_v2, of its own).
total=0
checkpoint=0
dumps=0
for dump in "$profile"*; do
  [ "$dump" = "$profile" ] && continue
  cost=$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")
  [ -n "$cost" ] || continue
  dumps=$((dumps + 1))
  if grep -q "sqlite3Checkpoint" "$dump" && ! grep -q "sqlite3_wal_checkpoint_v2" "$dump"; then
    checkpoint=$((checkpoint + cost))
  else
    total=$((total + cost))
  fi
done
[ "$dumps" -gt 0 ] || { echo "error: callgrind wrote no dump" >&2; exit 1; }
mkdir -p target/instructions-per-request
rm -f target/instructions-per-request/callgrind.out.*
cp "$profile"?* target/instructions-per-request/
echo "$requests plain front-door requests: $total instructions in the $what, $((total / requests)) per request"
echo "(the checkpoint thread, left out: $checkpoint)"
echo "profiles, one per thread: target/instructions-per-request/ (callgrind_annotate --inclusive=yes FILE)"
