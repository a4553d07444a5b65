#!/usr/bin/env bash
# What the nodes' `sched_batch` does to the whole sale: one `spike up`
# cluster as bench/spike.sh starts it (the balancer, four nodes weighted 1
# to 4, Redis, the order service, 10,000 tickets), and in each round one
# sale with the nodes under SCHED_BATCH, as shipped, and one with every
# thread of theirs switched to the default policy (`chrt -o`), taking turns
# to go first; `ab -k -l -c 1000` through the balancer.
#
#   bash bench/sched_batch.sh       # REQUESTS=500000 CONCURRENCY=1000 ROUNDS=5
#
# For each run it prints requests/s, p99 latency, the CPU per request of
# the balancer, of the nodes (all four) and of `ab`, and the context
# switches per request of the balancer and of the nodes (voluntary +
# involuntary); then, batch against default, the ratios of each round and
# their medians. It writes them to bench/results/sched_batch.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-500000}
CONCURRENCY=${CONCURRENCY:-1000}
ROUNDS=${ROUNDS:-5}

need ab apache2-utils
need redis-server
need curl
need chrt util-linux
need python3
cargo build --release --quiet --bin spike
ulimit -n 20000

make_workdir
mkdir -p bench/results
SCHED_BATCH=true spike_up_sale 10000

# The nodes' threads and the policy each started with (`chrt -b` or `-o`,
# from field 41 of their stat: 3 is SCHED_BATCH), to go back to.
shipped=()
for pid in "${node_pids[@]}"; do
  batched=false
  for task in /proc/"$pid"/task/*; do
    policy=$(awk '{print ($41 == 3) ? "-b" : "-o"}' "$task/stat")
    shipped+=("${task##*/}:$policy")
    [ "$policy" = -b ] && batched=true
  done
  # The runs as shipped are runs under SCHED_BATCH only if the node got it.
  if [ "$batched" = false ]; then
    echo "node $pid does not run under SCHED_BATCH; see $work/log" >&2
    exit 1
  fi
done

# nodes_policy batch|default: the nodes' threads as shipped, or all of them
# under the default policy (a thread gone since is passed over).
nodes_policy() {
  local entry tid flag
  for entry in "${shipped[@]}"; do
    tid=${entry%%:*} flag=${entry#*:}
    [ "$1" = default ] && flag=-o
    if ! chrt "$flag" -p 0 "$tid" 2>"$work/chrt.err" && [ -e "/proc/$tid" ]; then
      cat "$work/chrt.err" >&2
      exit 1
    fi
  done
}

# switches PIDS...: the context switches of every thread of PIDS so far.
switches() {
  local pid files=()
  for pid in "$@"; do files+=(/proc/"$pid"/task/*/status); done
  # A thread that ended since the listing is left out.
  { cat "${files[@]}" 2>/dev/null || true; } |
    awk '/^(non)?voluntary_ctxt_switches:/ {n += $2} END {print n + 0}'
}

# run NAME: one sale through the balancer (sale_run), and the context
# switches per request of the balancer and of the nodes.
run() {
  sale_run "$1" 'switches "$balancer_pid"' 'switches "${node_pids[@]}"'
}

results=$work/results
: >"$results"
for round in $(seq 1 "$ROUNDS"); do
  order="batch default"
  [ $((round % 2)) -eq 0 ] && order="default batch"
  for policy in $order; do
    nodes_policy "$policy"
    new_sale
    echo "$round $policy $(run "$policy$round")" >>"$results"
    grep -q '^Failed requests: *0' "$work/$policy$round.ab" || { cat "$work/$policy$round.ab" >&2; exit 1; }
  done
done

kill -TERM "$spike_pid"
wait "$spike_pid" || true

{
  echo "Machine: $(machine)"
  echo "ab -k -l -n $REQUESTS -c $CONCURRENCY through the balancer; 10000 tickets; 4 nodes weighted 1-4; $ROUNDS rounds, the policies taking turns to go first"
  echo
  echo "| round | nodes' policy | req/s | p99 ms | balancer / nodes / ab CPU us/req | balancer / nodes context switches per request |"
  echo "|---:|---|---:|---:|---:|---:|"
  while read -r round policy rps p99 cpu nodes ab sw nodes_sw; do
    name="SCHED_BATCH (sched_batch = true)"
    [ "$policy" = default ] && name="default (chrt -o)"
    echo "| $round | $name | $rps | $p99 | $cpu / $nodes / $ab | $sw / $nodes_sw |"
  done <"$results"
  echo
  awk "$MEDIAN_AWK"'
    { key = $1 SUBSEP $2; rps[key] = $3; cpu[key] = $5; nodes[key] = $6 }
    END {
      for (r = 1; (r SUBSEP "batch") in rps; r++) {
        b = r SUBSEP "batch"; d = r SUBSEP "default"
        thr[r] = rps[b] / rps[d]; bal[r] = cpu[b] / cpu[d]; nod[r] = nodes[b] / nodes[d]
        printf "round %d, batch / default: throughput %.2fx, balancer CPU per request %.2fx, nodes CPU per request %.2fx\n", r, thr[r], bal[r], nod[r]
      }
      n = r - 1
      printf "batch / default, medians of the rounds: throughput %.2fx, balancer CPU per request %.2fx, nodes CPU per request %.2fx\n", median(thr, n), median(bal, n), median(nod, n)
    }' "$results"
} | tee bench/results/sched_batch.md
