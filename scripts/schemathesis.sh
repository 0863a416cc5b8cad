#!/usr/bin/env bash
# The property-based check of /openapi.json: starts the service (debug build) on a
# throw-away database with an admin token, validates the document with
# openapi-spec-validator, then lets Schemathesis generate requests from it (every check
# but not_a_server_error: the contract's 502 and 503, for a TI that cannot be reached and
# a model with no TI, are answers, not faults). /admin/drain is left out (it would drain
# the service under test) and so is /predictor/lookup_table (its JSON records have rules,
# increasing quantiles of equal length, that JSON Schema cannot say). Installs both tools
# into target/schemathesis-venv (needs python3 with venv, and PyPI). Not run by .ci/run:
# it takes about five minutes. Usage: scripts/schemathesis.sh [MAX_EXAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/schemathesis-venv
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q schemathesis openapi-spec-validator
fi
cargo build --quiet
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TI_SCHEDULER__SERVER__ADMIN_TOKEN=schemathesis target/debug/ti-scheduler serve \
  --db "$dir/st.db" --bind "127.0.0.1:$port" 2>"$dir/service.log" &
service=$!
trap 'kill $service 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/openapi.json" >"$dir/openapi.json"
"$venv/bin/python" -c "import json, sys; from openapi_spec_validator import validate; \
validate(json.load(open(sys.argv[1]))); print('openapi-spec-validator: valid')" "$dir/openapi.json"
NO_PROXY=127.0.0.1,localhost "$venv/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
  --max-examples "${1:-30}" --checks all --exclude-checks not_a_server_error --workers 1 \
  -H "Authorization: Bearer schemathesis" \
  --exclude-path /admin/drain --exclude-path /predictor/lookup_table
