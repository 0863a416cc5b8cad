#!/usr/bin/env bash
# The crash tests with many kill points (queue submits on both kinds of TI, and the
# OpenAI front door): the release binary under concurrent submits from
# four clients against three simulated TIs, SIGKILLed at random moments (submits,
# dispatches, callbacks and a cleanup job running every second), restarted on the same
# database each time. It fails if any acknowledged task is missing or unfinished, or if any
# task ran twice. Usage: scripts/crash-loop.sh [KILL_POINTS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
export CRASH_KILLS="${1:-25}"
if [ -n "${2:-}" ]; then export CRASH_SEED="$2"; fi
cargo test --release --test process -- no_acknowledged_task_is_lost no_front_door_request_is_lost --nocapture 2>&1 \
  | grep -E "^(crash test|kill |test |thread|assertion)|panicked|FAILED|left|right"
