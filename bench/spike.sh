#!/usr/bin/env bash
# The seed article's claim on this machine: 1,000,000 purchase requests
# from 1,000 concurrent clients against a `spike up` cluster (the balancer,
# four nodes weighted 1 to 4, Redis) selling 10,000 tickets. Then the same
# against the same nodes with nginx in the balancer's place.
#
#   bash bench/spike.sh             # REQUESTS=1000000 CONCURRENCY=1000
#
# For each run it reports requests/s, p50, p99 and p99.9 latency, the
# tickets sold (10,000 exactly, or the run failed), the purchase scripts the
# nodes sent to Redis (close to the stock, not the request count; beside
# them, every script Redis ran, from INFO commandstats, the nodes' expiry
# sweeps included), and the peak memory of the proxy and of each node. It
# writes the figures to bench/results/spike.md and a latency-over-time plot
# to bench/results/spike-latency.png (matplotlib).
#
# Stat and access logs are off; nginx runs as many workers as the balancer
# has threads (one per core) with keep-alive to the nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-1000000}
CONCURRENCY=${CONCURRENCY:-1000}
TOTAL=10000

need ab apache2-utils
need nginx
need redis-server
need redis-cli redis-tools
need python3
need curl
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
cargo build --release --quiet --bin spike
ulimit -n 20000

make_workdir
mkdir -p bench/results
spike_up_sale "$TOTAL"
balancer_pid=$(awk '/started the balancer/ {gsub(/[^0-9]/, "", $7); print $7}' "$work/spike.out")
node_pids=($(awk '/started node-/ {sub(/.*\(pid /, ""); sub(/,.*/, ""); print}' "$work/spike.out"))

redis() { redis-cli -p "$redis_port" "$@"; }
script_calls() {
  redis info commandstats | tr -d '\r' | awk -F'[=,]' '/^cmdstat_eval(sha)?:/ {n += $2} END {print n + 0}'
}
# The purchase scripts the nodes have sent so far, from their /stats.
purchase_scripts() {
  local port total=0
  for port in "${node_ports[@]}"; do
    total=$((total + $(curl -fsS "http://127.0.0.1:$port/stats" | grep -o '"purchase_scripts":[0-9]*' | cut -d: -f2)))
  done
  echo "$total"
}

# run NAME PORT PROXY_PIDS...: one ab run against the proxy on PORT; prints
# "requests_per_sec sold purchase_scripts/all_scripts proxy_cpu_us_per_request
# proxy_peak_kib node_peak_kib..."
run() {
  local name=$1 port=$2
  shift 2
  redis config resetstat >/dev/null
  local before after scripts_before
  scripts_before=$(purchase_scripts)
  before=$(cpu_ticks "$@")
  ab -q -k -l -r -n "$REQUESTS" -c "$CONCURRENCY" -g "$work/$name.tsv" \
    "http://127.0.0.1:$port/buy/ticket" >"$work/$name.ab"
  after=$(cpu_ticks "$@")
  local rps sold calls cpu
  rps=$(awk '/^Requests per second:/ {print $4}' "$work/$name.ab")
  sold=$(redis hget 'spike:{ticket}:stock' sold)
  calls="$(($(purchase_scripts) - scripts_before))/$(script_calls)"
  cpu=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v n="$REQUESTS" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')
  echo "$rps $sold ${calls:-0} $cpu $(peak_rss_kib "$@") $(for pid in "${node_pids[@]}"; do peak_rss_kib "$pid"; done | paste -sd' ')"
}

# Prints the peak resident memory (VmHWM) of the given pids, in KiB.
peak_rss_kib() {
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")))
  done
  echo "$total"
}

read -r s_rps s_sold s_calls s_cpu s_mem s_nodes <<<"$(run spike "$proxy_port" "$balancer_pid")"

# The same nodes, the sale started over, nginx in the balancer's place.
target/release/spike reset --config-dir "$work/config" >/dev/null
for port in "${node_ports[@]}"; do
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/stats" | grep -q '"global_sold_out":false' && break
    sleep 0.05
  done
done
start_nginx_proxy "$(nproc)" "${node_ports[@]}"
read -r n_rps n_sold n_calls n_cpu n_mem _ <<<"$(run nginx "$nginx_port" $(with_children "$nginx_pid"))"

kill -TERM "$spike_pid"
wait "$spike_pid" || true

latency=$(python3 bench/latency.py bench/results/spike-latency.png \
  "$REQUESTS purchases from $CONCURRENCY clients, $TOTAL tickets: latency per second of the run" \
  "spike=$work/spike.tsv" "nginx=$work/nginx.tsv")
read -r _ s_p50 s_p99 s_p999 _ <<<"$(echo "$latency" | grep '^spike ')"
read -r _ n_p50 n_p99 n_p999 _ <<<"$(echo "$latency" | grep '^nginx ')"

{
  echo "Machine: $(machine)"
  echo "ab -k -l -n $REQUESTS -c $CONCURRENCY; $TOTAL tickets; 4 nodes weighted 1-4; $(nginx -v 2>&1 | sed 's/^nginx version: //')"
  echo
  echo "| proxy | req/s | p50 ms | p99 ms | p99.9 ms | tickets sold | purchase scripts / all in Redis | proxy CPU us/req | proxy peak RSS | node peak RSS (1, 2, 3, 4) |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  echo "| spike balancer | $s_rps | $s_p50 | $s_p99 | $s_p999 | $s_sold | $s_calls | $s_cpu | $((s_mem / 1024)) MiB | $(for k in $s_nodes; do printf '%s ' "$((k / 1024))"; done)MiB |"
  echo "| nginx | $n_rps | $n_p50 | $n_p99 | $n_p999 | $n_sold | $n_calls | $n_cpu | $((n_mem / 1024)) MiB | (the same nodes) |"
  echo
  awk -v s="$s_rps" -v n="$n_rps" -v sp="$s_p99" -v np="$n_p99" -v sc="$s_cpu" -v nc="$n_cpu" 'BEGIN {
    printf "spike / nginx: throughput %.2fx, p99 latency %.2fx, proxy CPU per request %.2fx\n", s / n, sp / np, sc / nc
  }'
} | tee bench/results/spike.md

[ "$s_sold" = "$TOTAL" ] && [ "$n_sold" = "$TOTAL" ] || { echo "tickets sold are not exactly $TOTAL" >&2; exit 1; }
