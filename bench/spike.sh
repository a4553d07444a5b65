#!/usr/bin/env bash
# The seed article's claim on this machine: 1,000,000 purchase requests
# from 1,000 concurrent clients against a `spike up` cluster (the balancer,
# four nodes weighted 1 to 4, Redis) selling 10,000 tickets. Then the same
# against the same nodes with nginx in the balancer's place.
#
#   bash bench/spike.sh             # REQUESTS=1000000 CONCURRENCY=1000
#
#   ROUNDS=5                        # rounds of one sale through each
#   SCHED_BATCH=false               # the nodes under the default policy
#
# The sale is started over before each run. The proxies take turns, the
# balancer first in odd rounds and nginx first in even ones, so that
# neither always runs on the fresher machine. For each run it reports
# requests/s, p50, p99 and p99.9 latency, the tickets sold (10,000 exactly,
# or the run failed), the purchase scripts the nodes sent to Redis (close
# to the stock, not the request count; beside them, every script Redis ran,
# from INFO commandstats, the nodes' expiry sweeps included), and the peak
# memory of the proxy and of each node; then, balancer against nginx, the
# ratios of each round and their medians. It writes the figures to
# bench/results/spike.md and the latency over time of the round with the
# median throughput ratio to bench/results/spike-latency.png (matplotlib).
#
# Stat and access logs are off; nginx runs as many workers as the balancer
# has threads (one per core) with keep-alive to the nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-1000000}
CONCURRENCY=${CONCURRENCY:-1000}
ROUNDS=${ROUNDS:-5}
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
# proxy_user_cpu nodes_cpu redis_cpu orders_cpu ab_cpu proxy_peak_kib node_peak_kib..."
# (CPU in microseconds per request)
run() {
  local name=$1 port=$2
  shift 2
  redis config resetstat >/dev/null
  local before after user_before user_after scripts_before
  scripts_before=$(purchase_scripts)
  local -a rest_before
  before=$(cpu_ticks "$@")
  user_before=$(user_ticks "$@")
  read -r -a rest_before <<<"$(rest_ticks)"
  local ab_cpu
  ab_cpu=$(ab_run "$work/$name.ab" -q -k -l -r -n "$REQUESTS" -c "$CONCURRENCY" -g "$work/$name.tsv" \
    "http://127.0.0.1:$port/buy/ticket")
  after=$(cpu_ticks "$@")
  user_after=$(user_ticks "$@")
  local -a rest_after
  read -r -a rest_after <<<"$(rest_ticks)"
  local rps sold calls cpu
  rps=$(awk '/^Requests per second:/ {print $4}' "$work/$name.ab")
  sold=$(redis hget 'spike:{ticket}:stock' sold)
  calls="$(($(purchase_scripts) - scripts_before))/$(script_calls)"
  cpu="$(per_request $((after - before))) $(per_request $((user_after - user_before)))"
  # The rest of the machine: the nodes, Redis, the order service, ab.
  local others="" i
  for i in 0 1 2; do others+="$(per_request $((rest_after[i] - rest_before[i]))) "; done
  others+=$ab_cpu
  echo "$rps $sold ${calls:-0} $cpu $others $(peak_rss_kib "$@") $(for pid in "${node_pids[@]}"; do peak_rss_kib "$pid"; done | paste -sd' ')"
}

# rest_ticks: the CPU clock ticks of the nodes (all of them), of Redis and
# of the order service, on one line.
rest_ticks() {
  echo "$(cpu_ticks "${node_pids[@]}") $(cpu_ticks "$redis_pid") $(cpu_ticks "$orders_pid")"
}

# Prints the peak resident memory (VmHWM) of the given pids, in KiB.
peak_rss_kib() {
  local total=0 pid
  for pid in "$@"; do
    total=$((total + $(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")))
  done
  echo "$total"
}

start_nginx_proxy "$(nproc)" "${node_ports[@]}"
nginx_pids=$(with_children "$nginx_pid")

# One line per run: "round proxy" and what run prints (`figures` adds the
# latency percentiles from the round's latency file).
results=$work/results
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
  order="spike nginx"
  [ $((round % 2)) -eq 0 ] && order="nginx spike"
  for proxy in $order; do
    new_sale
    if [ "$proxy" = spike ]; then
      figures=$(run "spike$round" "$proxy_port" "$balancer_pid")
    else
      figures=$(run "nginx$round" "$nginx_port" $nginx_pids)
    fi
    echo "$round $proxy $figures" >>"$results"
  done
  python3 bench/latency.py "$work/round$round.png" \
    "$REQUESTS purchases from $CONCURRENCY clients, $TOTAL tickets: latency per second of the run" \
    "spike=$work/spike$round.tsv" "nginx=$work/nginx$round.tsv" >"$work/latency$round"
done

kill -TERM "$spike_pid"
wait "$spike_pid" || true

# figures ROUND PROXY: that run's line, its latency percentiles appended.
figures() {
  echo "$(awk -v r="$1" -v p="$2" '$1 == r && $2 == p' "$results") $(awk -v p="$2" '$1 == p {print $2, $3, $4}' "$work/latency$1")"
}

{
  echo "Machine: $(machine)"
  echo "ab -k -l -n $REQUESTS -c $CONCURRENCY; $TOTAL tickets; 4 nodes weighted 1-4, sched_batch = ${SCHED_BATCH:-true}; $(nginx -v 2>&1 | sed 's/^nginx version: //'); $ROUNDS rounds, the proxies taking turns to go first"
  echo
  echo "| round | proxy | req/s | p50 ms | p99 ms | p99.9 ms | tickets sold | purchase scripts / all in Redis | proxy CPU us/req (user space) | nodes / Redis / orders / ab CPU us/req | proxy peak RSS | node peak RSS (1, 2, 3, 4) |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  for round in $(seq 1 "$ROUNDS"); do
    for proxy in spike nginx; do
      read -r _ _ rps sold calls cpu user c_nodes c_redis c_orders c_ab mem n1 n2 n3 n4 p50 p99 p999 <<<"$(figures "$round" "$proxy")"
      nodes="$((n1 / 1024)) $((n2 / 1024)) $((n3 / 1024)) $((n4 / 1024)) MiB"
      [ "$proxy" = nginx ] && nodes="(the same nodes)"
      name="spike balancer"
      [ "$proxy" = nginx ] && name=nginx
      echo "| $round | $name | $rps | $p50 | $p99 | $p999 | $sold | $calls | $cpu ($user) | $c_nodes / $c_redis / $c_orders / $c_ab | $((mem / 1024)) MiB | $nodes |"
    done
  done
  echo
  for round in $(seq 1 "$ROUNDS"); do
    read -r _ _ s_rps _ _ s_cpu s_user _ _ _ _ _ _ _ _ _ _ s_p99 _ <<<"$(figures "$round" spike)"
    read -r _ _ n_rps _ _ n_cpu n_user _ _ _ _ _ _ _ _ _ _ n_p99 _ <<<"$(figures "$round" nginx)"
    echo "$round $s_rps $n_rps $s_p99 $n_p99 $s_cpu $n_cpu $s_user $n_user"
  done | awk -v ratios="$work/ratios" "$MEDIAN_AWK"'
    {
      n++; thr[n] = $2 / $3; p99[n] = $4 / $5; cpu[n] = $6 / $7; user[n] = $8 / $9
      print $1, thr[n] >ratios
      printf "round %d, spike / nginx: throughput %.2fx, p99 latency %.2fx, proxy CPU per request %.2fx (user space %.2fx)\n", $1, thr[n], p99[n], cpu[n], user[n]
    }
    END {
      printf "spike / nginx, medians of the rounds: throughput %.2fx, p99 latency %.2fx, proxy CPU per request %.2fx (user space %.2fx)\n", median(thr, n), median(p99, n), median(cpu, n), median(user, n)
    }'
} | tee bench/results/spike.md

# The plot of the round whose throughput ratio is the median.
median_round=$(sort -k2 -g "$work/ratios" | awk -v m=$(((ROUNDS + 1) / 2)) 'NR == m {print $1}')
cp "$work/round$median_round.png" bench/results/spike-latency.png

awk -v total="$TOTAL" '$4 != total {bad = 1} END {exit bad}' "$results" || {
  echo "tickets sold are not exactly $TOTAL in every run" >&2
  exit 1
}
