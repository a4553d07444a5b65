#!/usr/bin/env bash
# What the balancer's `pipeline_depth` does to the whole sale: one `spike
# up` cluster as bench/spike.sh starts it (the balancer, four nodes
# weighted 1 to 4, Redis, the order service, 10,000 tickets), and in each
# round one sale per depth, the balancer's file rewritten between them (it
# reloads it live), the depths taking turns to go first; `ab -k -l -c
# 1000` through the balancer.
#
#   bash bench/pipeline.sh          # REQUESTS=500000 CONCURRENCY=1000 ROUNDS=5
#
#   DEPTHS="16 1"                   # the depths, the shipped one first
#
# For each run it prints requests/s, p99 latency, the CPU per request of
# the balancer, of the nodes (all four) and of `ab`, and the TCP segments
# the machine received per request (all of them: client to balancer,
# balancer to nodes and back, Redis); then, each depth against the last
# of DEPTHS, the ratios of each round and their medians. It writes them
# to bench/results/pipeline.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-500000}
CONCURRENCY=${CONCURRENCY:-1000}
ROUNDS=${ROUNDS:-5}
read -r -a depths <<<"${DEPTHS:-16 1}"
baseline=${depths[-1]}

need ab apache2-utils
need redis-server
need curl
need python3
cargo build --release --quiet --bin spike
ulimit -n 20000

make_workdir
mkdir -p bench/results
spike_up_sale 10000
balancer_log=$work/log/balancer.log
[ -f "$balancer_log" ] || { echo "no balancer log at $balancer_log" >&2; exit 1; }

# set_depth N: pipeline_depth = N in the balancer's file, waited for until
# the balancer says it reloaded it.
set_depth() {
  local before
  grep -q "^pipeline_depth = $1\$" "$work/config/balancer.toml" && return
  before=$(grep -c 'configuration reloaded' "$balancer_log" || true)
  sed "s/^pipeline_depth = .*/pipeline_depth = $1/" "$work/config/balancer.toml" >"$work/balancer.toml.new"
  mv "$work/balancer.toml.new" "$work/config/balancer.toml"
  for _ in $(seq 1 100); do
    [ "$(grep -c 'configuration reloaded' "$balancer_log" || true)" -gt "$before" ] && return
    sleep 0.05
  done
  echo "the balancer did not reload pipeline_depth = $1" >&2
  exit 1
}

# segments: TCP segments this machine has received so far.
segments() {
  awk '/^Tcp:/ { if (!names) { for (i = 1; i <= NF; i++) if ($i == "InSegs") col = i; names = 1 } else print $col }' /proc/net/snmp
}

# run NAME: one sale through the balancer (sale_run), and the TCP segments
# received per request.
run() {
  sale_run "$1" segments
}

results=$work/results
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
  order=("${depths[@]}")
  # Every other round, the other way round.
  if [ $((round % 2)) -eq 0 ]; then
    order=()
    for ((i = ${#depths[@]} - 1; i >= 0; i--)); do order+=("${depths[i]}"); done
  fi
  for depth in "${order[@]}"; do
    set_depth "$depth"
    new_sale
    echo "$round $depth $(run "depth$depth-$round")" >>"$results"
    grep -q '^Failed requests: *0' "$work/depth$depth-$round.ab" || { cat "$work/depth$depth-$round.ab" >&2; exit 1; }
  done
done

kill -TERM "$spike_pid"
wait "$spike_pid" || true

{
  echo "Machine: $(machine)"
  echo "ab -k -l -n $REQUESTS -c $CONCURRENCY through the balancer; 10000 tickets; 4 nodes weighted 1-4, sched_batch = true; pipeline_depth ${depths[*]}; $ROUNDS rounds, the depths taking turns to go first"
  echo
  echo "| round | pipeline_depth | req/s | p99 ms | balancer / nodes / ab CPU us/req | TCP segments received per request |"
  echo "|---:|---:|---:|---:|---:|---:|"
  while read -r round depth rps p99 cpu nodes ab segs; do
    echo "| $round | $depth | $rps | $p99 | $cpu / $nodes / $ab | $segs |"
  done <"$results"
  echo
  awk -v base="$baseline" "$MEDIAN_AWK"'
    { key = $1 SUBSEP $2; rps[key] = $3; p99[key] = $4; cpu[key] = $5; nodes[key] = $6; depth[$2] = 1; rounds = $1 }
    END {
      for (d in depth) {
        if (d == base) continue
        for (r = 1; r <= rounds; r++) {
          a = r SUBSEP d; b = r SUBSEP base
          thr[r] = rps[a] / rps[b]; lat[r] = p99[a] / p99[b]; bal[r] = cpu[a] / cpu[b]; nod[r] = nodes[a] / nodes[b]
          printf "round %d, depth %s / depth %s: throughput %.2fx, p99 %.2fx, balancer CPU per request %.2fx, nodes CPU per request %.2fx\n", r, d, base, thr[r], lat[r], bal[r], nod[r]
        }
        printf "depth %s / depth %s, medians of the rounds: throughput %.2fx, p99 %.2fx, balancer CPU per request %.2fx, nodes CPU per request %.2fx\n", d, base, median(thr, rounds), median(lat, rounds), median(bal, rounds), median(nod, rounds)
      }
    }' "$results"
} | tee bench/results/pipeline.md
