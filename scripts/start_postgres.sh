#!/usr/bin/env bash
# Install (from Debian's packages, if missing) and start a PostgreSQL server for the store tests,
# with a `fedpt` role and database. Prints the URL to put in FEDPT_TEST_POSTGRES_URL.
# Needs root (CI and the developer machines run as root).
set -euo pipefail
PGPORT=${PGPORT:-5432}
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! pg_lsclusters -h 2>/dev/null | grep -q "^$version main"; then
  pg_createcluster "$version" main -p "$PGPORT" >&2
fi
if ! pg_lsclusters -h | grep -q "^$version main .* online"; then
  pg_ctlcluster "$version" main start >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
for _ in $(seq 1 30); do
  su postgres -c "psql -p $port -qtAc 'select 1'" >/dev/null 2>&1 && break
  sleep 1
done
su postgres -c "psql -p $port -qtAc \"select 1 from pg_roles where rolname = 'fedpt'\"" | grep -q 1 ||
  su postgres -c "psql -p $port -qc \"create role fedpt login password 'fedpt' createdb\"" >&2
su postgres -c "psql -p $port -qtAc \"select 1 from pg_database where datname = 'fedpt_test'\"" | grep -q 1 ||
  su postgres -c "createdb -p $port -O fedpt fedpt_test" >&2
echo "postgresql+psycopg://fedpt:fedpt@127.0.0.1:$port/fedpt_test"
