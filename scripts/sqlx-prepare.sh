#!/usr/bin/env bash
# Regenerates sqlx-data/, the offline metadata of every compile-time checked query, from
# a database migrated with migrations/. Run it after changing a query or a migration, and
# commit sqlx-data/. Needs only python3 (for its sqlite3 module) and cargo.
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

rm -rf sqlx-data
mkdir -p sqlx-data
# Online mode: each query! is checked against $db and its metadata written to sqlx-data/.
touch src/lib.rs
DATABASE_URL="sqlite://$PWD/$db" SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/sqlx-data" \
  cargo check --all-targets --quiet
echo "sqlx-data: $(ls sqlx-data | wc -l) queries"
