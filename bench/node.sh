#!/usr/bin/env bash
# One ticket node, measured directly on its two paths, beside nginx answering
# a static 200 on the same machine in the same run: the floor any HTTP
# backend is measured against.
#
#   bash bench/node.sh            # DURATION=10 CONNECTIONS=64 RUNS=3 by default
#   SCHED_BATCH=false             # the node under the default policy
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
#   beside it. Redis has one replica, as a sale that must survive a
#   failover runs it.
# - node, selling path with replica_acks = 1: the same, each purchase
#   answered once the replica acknowledged it (WAIT): the cost of the
#   guarantee per sale.
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
replica_port=$(free_port)
redis-server --port "$replica_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --replicaof 127.0.0.1 "$redis_port" >"$work/replica.log" 2>&1 &
replica_pid=$!
pids+=("$replica_pid")
wait_port "$replica_port"
for _ in $(seq 1 500); do
  if redis-cli -p "$redis_port" info replication | grep -q '^connected_slaves:1'; then
    break
  fi
  sleep 0.02
done

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

# start_node EVENT TOTAL [ACKS]: a node selling from sale EVENT of TOTAL
# tickets, waiting for ACKS replicas (0 by default); sets node_port and
# node_pid.
start_node() {
  local event=$1 total=$2 acks=${3:-0} port
  port=$(free_port)
  cat >"$work/$event.toml" <<EOF
listen = "127.0.0.1:$port"
redis_url = "$redis"
event = "$event"
total_stock = $total
local_stock = $total
stat_log = "$work/$event-stat.log"
replica_acks = $acks
sched_batch = ${SCHED_BATCH:-true}
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
start_node acked 1000000000 1
acked_port=$node_port acked_pid=$node_pid

echo "Machine: $(machine)"
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s, median of $RUNS interleaved runs"
echo
printf '| %-24s | %10s | %8s | %8s | %14s |\n' target "req/s" "p50 ms" "p99 ms" "CPU us/req"
printf '|%s|%s|%s|%s|%s|\n' -------------------------- ------------ ---------- ---------- ----------------

redis_before=$(cpu_ticks "$redis_pid")
sold_of() {
  local sold
  sold=$(redis-cli -p "$redis_port" hget "spike:{$1}:stock" sold)
  echo "${sold:-0}"
}
sold_before=$(( $(sold_of open) + $(sold_of acked) ))
compare "nginx static 200|http://127.0.0.1:$nginx_port/|$(with_children "$nginx_pid")" \
  "node, sold-out path|http://127.0.0.1:$sold_out_port/buy/ticket|$sold_out_pid" \
  "node, selling path|http://127.0.0.1:$selling_port/buy/ticket|$selling_pid" \
  "selling, replica_acks=1|http://127.0.0.1:$acked_port/buy/ticket|$acked_pid"
redis_after=$(cpu_ticks "$redis_pid")
sold=$(( $(sold_of open) + $(sold_of acked) - sold_before ))
for name in "nginx static 200" "node, sold-out path" "node, selling path" "selling, replica_acks=1"; do
  read -r rps p50 p99 cpu _ <<<"${MEDIANS[$name]}"
  printf '| %-24s | %10.0f | %8.2f | %8.2f | %14.1f |\n' "$name" "$rps" "$p50" "$p99" "$cpu"
done
redis_cpu=$(awk -v t=$((redis_after - redis_before)) -v hz="$(getconf CLK_TCK)" -v n="$sold" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
echo
echo "Selling paths: $sold tickets sold; the master used $redis_cpu us of CPU per sale."
read -r s_rps s_p50 s_p99 s_cpu _ <<<"${MEDIANS[node, selling path]}"
read -r a_rps a_p50 a_p99 a_cpu _ <<<"${MEDIANS[selling, replica_acks=1]}"
awk -v sr="$s_rps" -v ar="$a_rps" -v s50="$s_p50" -v a50="$a_p50" -v s99="$s_p99" -v a99="$a_p99" -v sc="$s_cpu" -v ac="$a_cpu" 'BEGIN {
  printf "replica_acks = 1 / 0: throughput %.2fx, p50 %+.2f ms, p99 %+.2f ms, node CPU per sale %+.1f us\n", ar / sr, a50 - s50, a99 - s99, ac - sc
}' 
read -r n_rps _ _ n_cpu _ <<<"${MEDIANS[nginx static 200]}"
read -r o_rps _ _ o_cpu _ <<<"${MEDIANS[node, sold-out path]}"
awk -v o="$o_cpu" -v n="$n_cpu" -v or="$o_rps" -v nr="$n_rps" 'BEGIN {
  printf "Node sold-out path / nginx static: CPU per request %.2fx (target <= 1.30), throughput %.2fx\n", o / n, or / nr
}'
