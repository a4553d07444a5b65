#!/usr/bin/env bash
# What health checking costs the request path, counted in instructions: the
# balancer runs under callgrind, once with its health checks on (as shipped)
# and once with them off (active checks off, max_fails = 0), and serves the
# same 20,000 keep-alive requests from ab over four static backends. Counts
# of instructions are the same run after run whatever else the machine is
# doing, which wall-clock CPU time on a shared machine is not; the checks
# touch only user space (their probes, one per second per upstream, are
# counted too).
#
#   bash bench/health_cost.sh          # REQUESTS=20000
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-20000}

need valgrind
need callgrind_control valgrind
need nginx
need ab apache2-utils
need python3
cargo build --release --quiet --bin balancer

make_workdir
start_static_backends 4

# instructions NAME EXTRA_TOML: prints the balancer's instructions per
# request over $REQUESTS requests, after a warm-up.
instructions() {
  local name=$1 extra=$2 port pid dump total
  port=$(free_port)
  write_balancer_config "$work/$name.toml" "$port" "$(printf '[server]\nworkers = 1\n%s' "$extra")"
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/$name.out" \
    target/release/balancer --config "$work/$name.toml" >/dev/null 2>"$work/$name.valgrind" &
  pid=$!
  pids+=("$pid")
  dump=$(callgrind_requests "$name" "$port" "$pid")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  echo $((total / REQUESTS))
}

on=$(instructions checked "")
off=$(instructions unchecked "$CHECKS_OFF")
echo "Machine: $(machine)"
echo "balancer, 1 worker, $REQUESTS keep-alive requests (ab -k -c 16), 4 static backends"
echo
echo "| health checks | instructions per request |"
echo "|---|---:|"
echo "| on (as shipped) | $on |"
echo "| off | $off |"
echo
awk -v on="$on" -v off="$off" 'BEGIN { printf "on / off: %+.2f%% (target: within 3%%)\n", (on / off - 1) * 100 }'
