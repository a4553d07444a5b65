#!/usr/bin/env bash
# One ticket node, measured directly on its two paths, beside nginx answering
# a static 200 on the same machine in the same run: the floor any HTTP
# backend is measured against.
#
#   bash bench/node.sh            # DURATION=10 CONNECTIONS=64 RUNS=3 by default
#
# Prints, per target, the medians over RUNS of requests/s, p50 and p99
# latency, and the server's CPU microseconds per request (user + system, from
# /proc), then the node's CPU per request as a ratio of nginx's.
#
# - nginx: 2 worker processes (one per core here), access log on, like
#   Debian's default, keep-alive without a request limit.
# - node, sold-out path: a sale that is over; every request is answered from
#   memory (409). Its stat log is on, as shipped.
# - node, selling path: a sale too large to sell out during the run; every
#   request runs the purchase script in Redis (200). Redis's CPU is shown
#   beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
RUNS=${RUNS:-3}

need wrk
need nginx
need redis-server
need python3
cargo build --release --quiet --bin node

make_workdir

# Redis, for the node.
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" >"$work/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
wait_port "$redis_port"
redis="redis://127.0.0.1:$redis_port"

# nginx, answering a static 200 with a body the size of the node's reply.
nginx_port=$(free_port)
cat >"$work/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log $work/nginx-access.log;
  keepalive_requests 100000000;
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      default_type application/json;
      return 200 '{"error":"sold_out","node":"bench"}\n';
    }
  }
}
EOF
nginx -c "$work/nginx.conf" -e "$work/nginx-error.log" &
nginx_pid=$!
pids+=("$nginx_pid")
wait_port "$nginx_port"

# start_node EVENT TOTAL: a node selling from sale EVENT of TOTAL tickets;
# sets node_port and node_pid.
start_node() {
  local event=$1 total=$2 port
  port=$(free_port)
  cat >"$work/$event.toml" <<EOF
listen = "127.0.0.1:$port"
redis_url = "$redis"
event = "$event"
total_stock = $total
local_stock = $total
stat_log = "$work/$event-stat.log"
EOF
  RUST_LOG=warn target/release/node --config "$work/$event.toml" --name bench >/dev/null &
  node_pid=$!
  pids+=("$node_pid")
  wait_port "$port"
  # Ready once it has reached Redis and the sale exists.
  for _ in $(seq 1 500); do
    if curl -fsS "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"redis":"up"'; then
      break
    fi
    sleep 0.02
  done
  node_port=$port
}

start_node over 1
sold_out_port=$node_port sold_out_pid=$node_pid
curl -fsS "http://127.0.0.1:$sold_out_port/buy/ticket" >/dev/null   # the one ticket
start_node open 1000000000
selling_port=$node_port selling_pid=$node_pid

echo "Machine: $(machine)"
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s, median of $RUNS interleaved runs"
echo
printf '| %-22s | %10s | %8s | %8s | %14s |\n' target "req/s" "p50 ms" "p99 ms" "CPU us/req"
printf '|%s|%s|%s|%s|%s|\n' ------------------------ ------------ ---------- ---------- ----------------

redis_before=$(cpu_ticks "$redis_pid")
sold_before=$(redis-cli -p "$redis_port" hget 'spike:{open}:stock' sold)
compare "nginx static 200|http://127.0.0.1:$nginx_port/|$(with_children "$nginx_pid")" \
  "node, sold-out path|http://127.0.0.1:$sold_out_port/buy/ticket|$sold_out_pid" \
  "node, selling path|http://127.0.0.1:$selling_port/buy/ticket|$selling_pid"
redis_after=$(cpu_ticks "$redis_pid")
sold=$(( $(redis-cli -p "$redis_port" hget 'spike:{open}:stock' sold) - ${sold_before:-0} ))
for name in "nginx static 200" "node, sold-out path" "node, selling path"; do
  read -r rps p50 p99 cpu _ <<<"${MEDIANS[$name]}"
  printf '| %-22s | %10.0f | %8.2f | %8.2f | %14.1f |\n' "$name" "$rps" "$p50" "$p99" "$cpu"
done
redis_cpu=$(awk -v t=$((redis_after - redis_before)) -v hz="$(getconf CLK_TCK)" -v n="$sold" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
echo
echo "Selling path: $sold tickets sold; Redis used $redis_cpu us of CPU per sale."
read -r n_rps _ _ n_cpu _ <<<"${MEDIANS[nginx static 200]}"
read -r o_rps _ _ o_cpu _ <<<"${MEDIANS[node, sold-out path]}"
awk -v o="$o_cpu" -v n="$n_cpu" -v or="$o_rps" -v nr="$n_rps" 'BEGIN {
  printf "Node sold-out path / nginx static: CPU per request %.2fx (target <= 1.30), throughput %.2fx\n", o / n, or / nr
}'
