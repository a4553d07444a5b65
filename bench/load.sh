#!/usr/bin/env bash
# The load generator itself (`spike load`) beside ab, sending the same
# requests to the same target in one run: a node whose sale is over, so
# that every purchase is answered from memory and the client is what is
# measured. It must not be the bottleneck of a run the size of
# bench/spike.sh's.
#
#   bash bench/load.sh            # REQUESTS=200000 CONCURRENCY=1000 RUNS=3
#
# Prints, per client, the medians over RUNS (interleaved) of requests/s and
# the client's own CPU microseconds per request (user + system), then the
# ratios of spike load to ab. ab sends the same anonymous purchase each
# time; spike load sends named buyers (`--pay 0`, so purchases only), as a
# sale's buyers would.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-200000}
CONCURRENCY=${CONCURRENCY:-1000}
RUNS=${RUNS:-3}

need ab apache2-utils
need redis-server
need curl
cargo build --release --quiet --bin spike --bin node
ulimit -n 20000

make_workdir
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" >"$work/redis.log" 2>&1 &
pids+=("$!")
wait_port "$redis_port"
node_port=$(free_port)
printf 'listen = "127.0.0.1:%s"\nredis_url = "redis://127.0.0.1:%s"\ntotal_stock = 1\nlocal_stock = 1\nstat_log = ""\n' \
  "$node_port" "$redis_port" >"$work/node.toml"
RUST_LOG=warn target/release/node --config "$work/node.toml" >/dev/null &
pids+=("$!")
wait_port "$node_port"
for _ in $(seq 1 500); do
  curl -fsS "http://127.0.0.1:$node_port/health" | grep -q '"redis":"up"' && break
  sleep 0.02
done
# The one ticket goes; every request after it is answered from memory.
curl -fsS "http://127.0.0.1:$node_port/buy/ticket" >/dev/null

# timed COMMAND...: runs it; prints "wall_seconds cpu_seconds" of it.
timed() {
  local TIMEFORMAT='%R %U %S'
  { time "$@" >/dev/null 2>&1; } 2>&1 | awk '{print $1, $2 + $3}'
}

declare -A results
for run in $(seq 1 "$RUNS"); do
  results[ab]+="$(timed ab -q -k -l -n "$REQUESTS" -c "$CONCURRENCY" "http://127.0.0.1:$node_port/buy/ticket")"$'\n'
  results[load]+="$(timed target/release/spike load --url "http://127.0.0.1:$node_port" \
    --buyers "$REQUESTS" --concurrency "$CONCURRENCY" --pay 0 --prefix "bench-$run" --json)"$'\n'
done

# median NAME: the medians of the runs' requests/s and CPU us per request.
median() {
  printf '%s' "${results[$1]}" | awk -v n="$REQUESTS" 'NF {print n / $1, $2 * 1e6 / n}' |
    sort -n | awk '{rps[NR] = $1; cpu[NR] = $2} END {m = int((NR + 1) / 2); print rps[m], cpu[m]}'
}
read -r ab_rps ab_cpu <<<"$(median ab)"
read -r load_rps load_cpu <<<"$(median load)"

echo "Machine: $(machine)"
echo "$REQUESTS purchases from $CONCURRENCY clients at one node's sold-out path; median of $RUNS interleaved runs"
echo
printf '| %-24s | %10s | %18s |\n' client "req/s" "client CPU us/req"
printf '|%s|%s|%s|\n' -------------------------- ------------ --------------------
printf '| %-24s | %10.0f | %18.1f |\n' "ab -k" "$ab_rps" "$ab_cpu"
printf '| %-24s | %10.0f | %18.1f |\n' "spike load --pay 0" "$load_rps" "$load_cpu"
echo
awk -v lr="$load_rps" -v ar="$ab_rps" -v lc="$load_cpu" -v ac="$ab_cpu" 'BEGIN {
  printf "spike load / ab: throughput %.2fx, client CPU per request %.2fx\n", lr / ar, lc / ac
}'
