#!/usr/bin/env bash
# Regenerates sqlx-data/, the offline metadata of every compile-time checked query, from
# an SQLite database and a PostgreSQL database migrated with migrations/ and
# migrations/postgres/. Run it after changing a query or a migration, and commit
# sqlx-data/. Needs python3 (for its sqlite3 module), cargo and PostgreSQL's server
# binaries (Debian's `postgresql`): a throw-away cluster is started and removed.
#
# sqlx checks every query! against one database at a time (DATABASE_URL), and many
# statements are valid on both. So this runs twice, once against each database, each pass
# writing into a directory of its own, and keeps a query's metadata from the PostgreSQL
# pass if its text begins with the marker `/* pg */` (every PostgreSQL query in src/
# does), from the SQLite pass otherwise. The last step builds offline from sqlx-data/
# alone, which proves that every query has its metadata, for the right database.
set -euo pipefail
cd "$(dirname "$0")/.."

db="target/sqlx-prepare.db"
mkdir -p target
rm -f "$db" "$db-wal" "$db-shm"
python3 - "$db" <<'PY'
import glob, re, sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
key = lambda p: int(re.match(r".*/V(\d+)__", p).group(1))
for path in sorted(glob.glob("migrations/V*__*.sql"), key=key):
    conn.executescript(open(path).read())
conn.commit()
PY

cluster=$(mktemp -d)
trap 'scripts/pg-cluster.sh stop "$cluster"' EXIT
pg_url=$(scripts/pg-cluster.sh start "$cluster")
for migration in migrations/postgres/*.sql; do
    psql -q -v ON_ERROR_STOP=1 "$pg_url" -f "$migration" >/dev/null
done

pass() {
    rm -rf "$2" && mkdir -p "$2"
    touch src/lib.rs
    # Online mode: each query! is checked against $1 and its metadata written to $2; the
    # queries of the other database fail to check, so the build fails: expected.
    DATABASE_URL="$1" SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/$2" \
        cargo check --lib --quiet --message-format short >/dev/null 2>&1 || true
}
pass "sqlite://$PWD/$db" target/sqlx-sqlite
pass "$pg_url" target/sqlx-postgres

rm -rf sqlx-data
mkdir -p sqlx-data
python3 - <<'PY'
import glob, json, os, shutil
counts = {"SQLite": 0, "PostgreSQL": 0}
for source, want in (("target/sqlx-sqlite", "SQLite"), ("target/sqlx-postgres", "PostgreSQL")):
    for path in glob.glob(source + "/query-*.json"):
        data = json.load(open(path))
        ours = "PostgreSQL" if data["query"].startswith("/* pg */") else "SQLite"
        if ours == want:
            assert data["db_name"] == want, path
            shutil.copy(path, "sqlx-data/")
            counts[want] += 1
print(f"sqlx-data: {counts['SQLite']} SQLite queries, {counts['PostgreSQL']} PostgreSQL queries")
PY

touch src/lib.rs
if ! SQLX_OFFLINE=true cargo check --all-targets --quiet; then
    echo "sqlx-prepare: the offline build fails (above): a query did not check" >&2
    exit 1
fi
