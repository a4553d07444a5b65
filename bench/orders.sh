#!/usr/bin/env bash
# The order service (`orders`), measured two ways:
#
# 1. Events per second written by one service, into SQLite and into
#    PostgreSQL: a stream of ORDERS orders (each created, half of them
#    paid) written straight into Redis, then a fresh consumer group read
#    to the end, RUNS times per database, interleaved; the medians.
# 2. The lag during a sale the size of bench/spike.sh's: `spike up` (four
#    nodes, 10,000 tickets, the order service on SQLite) under
#    `ab -k -c 1000`, the service's /stats read every 100 ms: the most
#    events behind, and how long the oldest of them had waited.
#
#   bash bench/orders.sh          # ORDERS=100000 RUNS=3 REQUESTS=200000
#
# PostgreSQL comes from Debian's package and runs as `nobody` in a
# temporary folder, with its default durability (fsync on).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

ORDERS=${ORDERS:-100000}
RUNS=${RUNS:-3}
REQUESTS=${REQUESTS:-200000}

need redis-server
need ab apache2-utils
need python3
need curl
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need initdb postgresql
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
cargo build --release --quiet --bin orders --bin spike
ulimit -n 20000

make_workdir
chmod 755 "$work"
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" >"$work/redis.log" 2>&1 &
pids+=("$!")
wait_port "$redis_port"
redis() { redis-cli -p "$redis_port" "$@"; }

# PostgreSQL, as nobody.
mkdir "$work/pg"
chown nobody "$work/pg"
as_nobody() { runuser -u nobody -- "$@"; }
as_nobody "$pg_bin/initdb" --auth=trust --username=spike -D "$work/pg/data" >/dev/null
pg_port=$(free_port)
as_nobody "$pg_bin/postgres" -D "$work/pg/data" -h 127.0.0.1 -p "$pg_port" -k "$work/pg" \
  >"$work/pg/log" 2>&1 &
pids+=("$!")
wait_port "$pg_port"
for _ in $(seq 1 100); do
  as_nobody "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
  sleep 0.1
done

# The stream: ORDERS created events (ids 1000-N), then a payment of every
# other one (ids 2000-N), as the nodes would write them.
python3 - "$ORDERS" >"$work/stream.txt" <<'EOF'
import sys
n = int(sys.argv[1])
key = "spike:{ticket}:orders"
for i in range(n):
    print(f"XADD {key} 1000-{i} event created ticket {i + 1} buyer u{i} node node-1 "
          f"status pending time 1000 pay_by 901000")
for i in range(0, n, 2):
    print(f"XADD {key} 2000-{i} event paid order 1000-{i} ticket {i + 1} buyer u{i} "
          f"node node-2 status paid time 2000 created 1000 pay_by 901000")
EOF
redis-cli -p "$redis_port" <"$work/stream.txt" >/dev/null
events=$(redis xlen 'spike:{ticket}:orders')

# The stream is read again by every run: never trimmed.
echo 'trim_interval = "0s"' >"$work/bench-orders.toml"

# One run: a fresh group and database; prints the events per second.
run_once() {
  local database=$1 admin
  admin=$(free_port)
  redis xgroup destroy 'spike:{ticket}:orders' orders >/dev/null || true
  local started=$(date +%s.%N)
  target/release/orders --config "$work/bench-orders.toml" --redis "redis://127.0.0.1:$redis_port" \
    --database "$database" --admin "127.0.0.1:$admin" >/dev/null 2>>"$work/orders.log" &
  local pid=$!
  pids+=("$pid")
  wait_port "$admin"
  # Done when the group has read every entry and acknowledged it, as Redis
  # tells (the service's own /stats is refreshed once a second).
  while :; do
    local left
    left=$(redis xinfo groups 'spike:{ticket}:orders' |
      awk 'prev == "pending" || prev == "lag" {n += $1} {prev = $1} END {print NR ? n : -1}')
    [ "$left" = 0 ] && break
    sleep 0.02
  done
  local ended=$(date +%s.%N)
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  python3 -c "print(round($events / ($ended - $started)))"
}

median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
sqlite_rates=()
pg_rates=()
for run in $(seq 1 "$RUNS"); do
  rm -rf "$work/sqlite"
  sqlite_rates+=("$(run_once "sqlite://$work/sqlite/orders.db")")
  as_nobody "$pg_bin/psql" -q -h 127.0.0.1 -p "$pg_port" -U spike -d postgres \
    -c 'DROP TABLE IF EXISTS orders, order_events, _sqlx_migrations' >/dev/null
  pg_rates+=("$(run_once "postgres://spike@127.0.0.1:$pg_port/postgres")")
done
sqlite_rate=$(printf '%s\n' "${sqlite_rates[@]}" | median)
pg_rate=$(printf '%s\n' "${pg_rates[@]}" | median)

# The lag during a sale: spike up with the order service on SQLite.
spike_up_sale 10000

python3 - "$redis_port" "$orders_admin_port" >"$work/lag.tsv" <<'EOF' &
# Every 50 ms, from Redis itself: the events the group has not
# acknowledged or not read, and how long the oldest of them has waited;
# and the orders in the database, from the service.
import json, subprocess, sys, time, urllib.request
port, admin = sys.argv[1], sys.argv[2]
key = "spike:{ticket}:orders"
def redis(*args):
    return subprocess.run(["redis-cli", "-p", port, *args], capture_output=True, text=True).stdout.split()
orders = 0
while True:
    info = redis("xinfo", "groups", key)
    fields = dict(zip(info[::2], info[1::2]))
    if "pending" in fields:
        behind = int(fields["pending"]) + int(fields.get("lag", 0) or 0)
        first = redis("xpending", key, "orders")[1:2] if int(fields["pending"]) else []
        if not first and behind:
            first = redis("xrange", key, "(" + fields["last-delivered-id"], "+", "count", "1")[:1]
        secs, micros = redis("time")
        now = int(secs) * 1000 + int(micros) // 1000
        oldest = now - int(first[0].split("-")[0]) if first and behind else 0
        try:
            stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats", timeout=1))
            orders = (stats["orders"] or {}).get("orders", orders)
        except Exception:
            pass
        print(f"{time.time():.3f}\t{behind}\t{oldest}\t{orders}", flush=True)
    time.sleep(0.05)
EOF
sampler=$!
pids+=("$sampler")
ab -k -l -q -n "$REQUESTS" -c 1000 "http://127.0.0.1:$proxy_port/buy/ticket" >"$work/ab.out" 2>&1
for _ in $(seq 1 100); do
  [ "$(tail -1 "$work/lag.tsv" | cut -f4)" = 10000 ] && [ "$(tail -1 "$work/lag.tsv" | cut -f2)" = 0 ] && break
  sleep 0.1
done
kill "$sampler"
read -r max_events max_ms final_orders <<<"$(awk -F'\t' '
  $2 > e {e = $2} $3 > m {m = $3} {o = $4} END {print e + 0, m + 0, o + 0}' "$work/lag.tsv")"
sale_rps=$(awk '/Requests per second/ {print $4}' "$work/ab.out")

machine
echo "one order service, $events events ($ORDERS orders, half paid), batch 500; median of $RUNS interleaved runs"
echo
echo "| database | events/s written |"
echo "|---|---:|"
echo "| SQLite (WAL, a file) | $sqlite_rate |"
echo "| PostgreSQL $(basename "$(dirname "$pg_bin")") (fsync on) | $pg_rate |"
echo
echo "A sale of 10000 tickets under ab -k -c 1000 ($REQUESTS requests, $sale_rps req/s), order service on SQLite:"
echo "most events behind: $max_events; the oldest of them had waited at most $((max_ms)) ms (target: under 1000 ms); orders in the database at the end: $final_orders"
