#!/usr/bin/env bash
# Install PostgreSQL from the distribution's packages (if missing), start it on localhost, make a
# role and a database for the catalog tests, and print the SQLAlchemy URL to use, e.g.:
#   export ADAPTERHUB_TEST_POSTGRES_URL="$(.ci/postgres.sh)"
# Idempotent: run it again and it only checks. For a fresh Debian/Ubuntu machine, as root.
# Everything but the URL goes to stderr.
set -euo pipefail

PG_USER="${ADAPTERHUB_PG_USER:-adapterhub}"
PG_PASSWORD="${ADAPTERHUB_PG_PASSWORD:-adapterhub}"
PG_DB="${ADAPTERHUB_PG_DB:-adapterhub_test}"

if [ "$(id -u)" -ne 0 ]; then
  echo "postgres.sh: run as root (it installs packages and starts a server)" >&2
  exit 1
fi

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  echo "postgres.sh: installing postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi

VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VERSION main"; then
  echo "postgres.sh: creating cluster $VERSION/main" >&2
  pg_createcluster "$VERSION" main >&2
fi
PORT="$(pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $3}')"

if ! pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $4}' | grep -q online; then
  echo "postgres.sh: starting cluster $VERSION/main on port $PORT" >&2
  pg_ctlcluster "$VERSION" main start >&2
fi
for _ in $(seq 1 60); do
  pg_isready -q -h localhost -p "$PORT" && break
  sleep 0.5
done
pg_isready -h localhost -p "$PORT" >&2

psql_admin() { runuser -u postgres -- psql -p "$PORT" -v ON_ERROR_STOP=1 -tAq "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != "1" ]; then
  psql_admin -c "CREATE ROLE \"$PG_USER\" LOGIN PASSWORD '$PG_PASSWORD'" >&2
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != "1" ]; then
  psql_admin -c "CREATE DATABASE \"$PG_DB\" OWNER \"$PG_USER\"" >&2
fi

echo "postgresql://$PG_USER:$PG_PASSWORD@localhost:$PORT/$PG_DB"
