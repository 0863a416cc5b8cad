#!/usr/bin/env bash
# The failover tests (tests/failover.rs) with many failovers, on a throw-away PostgreSQL
# cluster (scripts/pg-cluster.sh, stopped on exit): three scheduler nodes with
# ha.enabled on one database under submit load from clients that follow the leader; the
# leader SIGKILLed at KILLS random moments, then, in a second run, SIGSTOPped past its
# lease and SIGCONTed at as many; and the fencing test (a leader whose lease was taken
# while it was paused commits nothing once resumed). It fails if an acknowledged task is
# lost or unfinished, a task ran on two TIs, a failover took longer than
# 2 x ha.lease_ms, a deposed leader committed anything or exited 0.
#
# Usage: scripts/failover-loop.sh [KILLS (default 20)] [SEED]
# FAILOVER_LEASE_MS sets the nodes' ha.lease_ms (default 1000 to keep the run short; the
# service's default is 3000).
#
# The debug build: a take-over costs a lease and some 50 ms of start-up (the cache
# rebuilt from the database), so the release build would change little here.
set -euo pipefail
cd "$(dirname "$0")/.."
export FAILOVER_KILLS="${1:-20}"
if [ -n "${2:-}" ]; then export FAILOVER_SEED="$2"; fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/ti-failover-pg.XXXXXX")
trap 'scripts/pg-cluster.sh stop "$dir"' EXIT
TI_TEST_POSTGRES=$(scripts/pg-cluster.sh start "$dir")
export TI_TEST_POSTGRES
cargo test --test failover -- --nocapture 2>&1 \
  | grep -E "^(failover|fencing|kill |stop |test |thread|assertion)|panicked|FAILED|left|right"
