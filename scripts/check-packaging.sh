#!/usr/bin/env bash
# Checks the packaging, the Dockerfile and packaging/ti-scheduler.service, with what this
# machine has, and says what it ran and what it skipped. Installs nothing; needs bash,
# grep, sed and awk, and builds target/debug/ti-scheduler when it is missing.
#
#  - Dockerfile, always: every instruction is one Dockerfile knows; the runtime stage has
#    a non-root USER, a VOLUME, EXPOSE and a HEALTHCHECK; the files it copies exist and
#    are not excluded by .dockerignore; the toolchain is Cargo.toml's rust-version; the
#    binary, its subcommands and flags, the TI_SCHEDULER__* settings and the port it
#    names are the project's.
#    When a Docker daemon answers: `docker build --check` (BuildKit's lint, seconds);
#    with CHECK_PACKAGING_DOCKER_BUILD=1 also the real build (minutes), a container run
#    until its health check passes, and a backup taken inside it.
#  - The unit, always: its subcommand, flags and settings are the project's. When
#    systemd-analyze exists: `systemd-analyze verify` (any warning fails) and
#    `systemd-analyze security --offline` (exposure at most 2.0).
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
  echo "check-packaging: FAILED: $*" >&2
  exit 1
}
say() { echo "check-packaging: $*"; }

# What to undo on exit (a container, a temporary directory).
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT

bin=target/debug/ti-scheduler
if [ ! -x "$bin" ]; then
  cargo build --locked --quiet --bin ti-scheduler
fi

# Dockerfile lines with their continuations joined, comments and blank lines dropped.
instructions() {
  awk '
    /^[[:space:]]*#/ && cont == "" { next }
    {
      line = cont $0
      if (line ~ /\\[[:space:]]*$/) { sub(/\\[[:space:]]*$/, " ", line); cont = line; next }
      cont = ""
      if (line ~ /^[[:space:]]*$/) next
      print line
    }' Dockerfile
}

# The setting named by TI_SCHEDULER__SECTION__KEY must be a key of config/default.toml.
check_setting() {
  local var=$1 rest section key
  rest=${var#TI_SCHEDULER__}
  section=$(echo "${rest%%__*}" | tr '[:upper:]' '[:lower:]')
  key=$(echo "${rest#*__}" | tr '[:upper:]' '[:lower:]')
  awk -v s="[$section]" -v k="$key" '
    /^\[/ { in_s = ($1 == s) }
    in_s && $1 == k && $2 == "=" { found = 1 }
    END { exit !found }' config/default.toml ||
    fail "$2 sets $var, but config/default.toml has no key $key in [$section]"
}

# `ti-scheduler SUBCOMMAND` must exist and take each of the given flags.
check_command() {
  local where=$1 sub=$2
  shift 2
  local help
  help=$("$bin" "$sub" --help 2>&1) || fail "$where runs \`ti-scheduler $sub\`, which does not exist"
  for flag in "$@"; do
    grep -qE -- "[[:space:]]$flag([[:space:]]|=|\$)" <<<"$help" || fail "$where passes $flag, which \`ti-scheduler $sub\` does not take"
  done
}

say "Dockerfile: static checks"
known=" FROM RUN COPY ADD ENV ARG USER WORKDIR VOLUME EXPOSE HEALTHCHECK STOPSIGNAL ENTRYPOINT CMD LABEL SHELL ONBUILD "
while read -r word _; do
  [[ $known == *" $word "* ]] || fail "Dockerfile: unknown instruction $word"
done < <(instructions)
runtime=$(instructions | awk '/^FROM /{ stage = "" } { stage = stage $0 "\n" } END { printf "%s", stage }')
for needed in USER VOLUME EXPOSE HEALTHCHECK; do
  grep -q "^$needed " <<<"$runtime" || fail "Dockerfile: the runtime stage has no $needed"
done
user=$(grep '^USER ' <<<"$runtime" | tail -1 | awk '{ print $2 }')
case "${user%%:*}" in
  root | 0) fail "Dockerfile: the runtime stage runs as root ($user)" ;;
esac
while read -r _ args; do
  [[ $args == --from=* ]] && continue
  read -ra parts <<<"$args"
  for src in "${parts[@]:0:${#parts[@]}-1}"; do
    [ "$src" = . ] && continue
    [ -e "$src" ] || fail "Dockerfile: COPY $src, which does not exist"
    while read -r pattern; do
      pattern=${pattern%/}
      [[ -z $pattern || $pattern == \#* ]] && continue
      if [[ $src == "$pattern" || $src == "$pattern"/* ]]; then
        fail "Dockerfile: COPY $src, which .dockerignore excludes ($pattern)"
      fi
    done <.dockerignore
  done
done < <(instructions | grep '^COPY ')
for needed in Cargo.toml Cargo.lock .cargo src migrations sqlx-data benches tests; do
  grep -qx "/\?$needed/\?" .dockerignore && fail ".dockerignore excludes $needed, which the build needs"
done
rust=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
grep -q "^ARG RUST_VERSION=$rust\$" Dockerfile ||
  fail "Dockerfile: ARG RUST_VERSION is not Cargo.toml's rust-version ($rust)"
package=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | head -1)
built=$(grep -o -- '--bin [a-z_-]*' <<<"$(instructions)" | awk '{ print $2 }')
[ "$built" = "$package" ] || fail "Dockerfile builds --bin '$built'; the binary is '$package'"
# The words of an exec-form (JSON array) command: ["a", "--b", "c"] → a --b c.
words() { sed 's/.*\[//; s/\].*//; s/"//g; s/,/ /g' <<<"$1"; }
# `ti-scheduler SUBCOMMAND ARGS...` must be a real subcommand taking each --flag in ARGS.
check_words() {
  local where=$1 program=$2 sub=$3
  shift 3
  [ "$program" = "$package" ] || fail "$where runs $program, not $package"
  local flags=()
  for arg in "$@"; do [[ $arg == --* ]] && flags+=("$arg"); done
  check_command "$where" "$sub" "${flags[@]}"
}
entrypoint=$(words "$(grep '^ENTRYPOINT ' <<<"$runtime")")
[ "$entrypoint" = "$package" ] || fail "Dockerfile: ENTRYPOINT is '$entrypoint', not [\"$package\"]"
# shellcheck disable=SC2046 # the words are meant to be split
check_words "Dockerfile CMD" "$package" $(words "$(grep '^CMD ' <<<"$runtime")")
# shellcheck disable=SC2046
check_words "Dockerfile HEALTHCHECK" $(words "$(grep '^HEALTHCHECK ' <<<"$runtime")")
for var in $(instructions | grep '^ENV ' | grep -o 'TI_SCHEDULER__[A-Z_]*=' | tr -d =); do
  check_setting "$var" Dockerfile
done
port=$(grep '^EXPOSE ' <<<"$runtime" | awk '{ print $2 }')
grep -q "TI_SCHEDULER__SERVER__BIND=[0-9.]*:$port " <<<"$(instructions) " ||
  fail "Dockerfile: EXPOSE $port is not the port of TI_SCHEDULER__SERVER__BIND"
grep -q "TI_SCHEDULER_URL=http://127.0.0.1:$port" Dockerfile ||
  fail "Dockerfile: TI_SCHEDULER_URL (the health check's address) is not port $port"
say "Dockerfile: static checks passed"

if command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then
  say "docker build --check ."
  docker build --check .
  if [ "${CHECK_PACKAGING_DOCKER_BUILD:-0}" = 1 ]; then
    say "docker build -t ti-scheduler:check . (the real build)"
    docker build -t ti-scheduler:check .
    container=$(docker run -d ti-scheduler:check)
    cleanup+=("docker rm -f $container >/dev/null")
    health=starting
    for _ in $(seq 60); do
      health=$(docker inspect --format '{{.State.Health.Status}}' "$container")
      [ "$health" = healthy ] && break
      sleep 2
    done
    [ "$health" = healthy ] || fail "the container is $health, not healthy: $(docker logs "$container" 2>&1 | tail -20)"
    docker exec "$container" ti-scheduler backup --to /var/lib/ti-scheduler/check-backup.db
    docker stop "$container" >/dev/null
    say "docker: built, healthy, backup taken inside, stopped"
  else
    say "skipped: the real docker build (set CHECK_PACKAGING_DOCKER_BUILD=1; it takes minutes)"
  fi
elif command -v docker >/dev/null 2>&1; then
  say "skipped: docker build (the docker client is here, but no Docker daemon answers)"
else
  say "skipped: docker build (no docker)"
fi

unit=packaging/ti-scheduler.service
say "$unit: static checks"
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
read -r unit_bin unit_sub unit_flag _ <<<"$exec_start"
[ "$(basename "$unit_bin")" = "$package" ] || fail "$unit runs $unit_bin, not the $package binary"
check_command "$unit ExecStart" "$unit_sub" "$unit_flag"
for file in "$unit" packaging/ti-scheduler.env; do
  for var in $(grep -o 'TI_SCHEDULER__[A-Z_]*=' "$file" | tr -d =); do
    check_setting "$var" "$file"
  done
done
say "$unit: static checks passed"

if command -v systemd-analyze >/dev/null 2>&1; then
  # verify wants ExecStart's binary to exist: check a copy that runs the one just built.
  tmp=$(mktemp -d)
  cleanup+=("rm -rf $tmp")
  sed "s#^ExecStart=$unit_bin #ExecStart=$PWD/$bin #" "$unit" >"$tmp/ti-scheduler.service"
  say "systemd-analyze verify $unit (ExecStart pointed at $bin)"
  out=$(systemd-analyze verify "$tmp/ti-scheduler.service" 2>&1) || fail "systemd-analyze verify: $out"
  [ -z "$out" ] || fail "systemd-analyze verify warns: $out"
  if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    say "systemd-analyze security --offline=true --threshold=20 $unit"
    out=$(systemd-analyze security --offline=true --threshold=20 "$tmp/ti-scheduler.service" 2>&1) ||
      fail "systemd-analyze security: exposure above 2.0: $(tail -1 <<<"$out")"
    say "$(grep -o 'Overall exposure level.*' <<<"$out")"
  else
    say "skipped: systemd-analyze security (this systemd is older than 250: no --offline)"
  fi
else
  say "skipped: no systemd-analyze (the unit's static checks ran)"
fi
say "done"
