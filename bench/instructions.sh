#!/usr/bin/env bash
# User-space work per proxied request, counted in instructions: this
# balancer (one worker) and nginx (one process) each run under callgrind
# and proxy the same keep-alive requests from ab to the same four static
# backends, weighted 1 to 4, health checks off. Instruction counts repeat
# run after run whatever else the machine is doing, which the user-space
# CPU time of bench/proxy.sh on a shared machine does not; they do not
# count the kernel's work, nor how fast the instructions run. What slows
# instructions down is estimated too, as callgrind simulates it: misses of
# the first-level instruction and data caches and of the second-level cache
# (this machine's sizes, from /sys; the L2 is callgrind's last level, as
# the L3 of a shared machine is shared with its neighbours), and
# mispredicted branches; and the atomic read-modify-write instructions run
# (bench/locked.py), each some twenty cycles that no count of instructions
# shows. With many connections at once (CONCURRENCY=1000), what a request
# touches of its connection's state has left the L2 by its next turn: the
# L2 misses count that.
#
#   bash bench/instructions.sh          # REQUESTS=20000 CONCURRENCY=16
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-20000}
export CONCURRENCY=${CONCURRENCY:-16}

need valgrind
need callgrind_control valgrind
need nginx
need ab apache2-utils
need python3
need objdump binutils
cargo build --release --quiet --bin balancer
ulimit -n 20000

make_workdir
start_static_backends 4

# count NAME PORT PID BINARY: per request over $REQUESTS requests to PORT,
# after a warm-up, what PID ran: "instructions i1_misses d1_misses
# l2_misses mispredicts atomics" (the atomics of BINARY's own code);
# callgrind writes to $work/NAME.out.
count() {
  local name=$1 port=$2 pid=$3 binary=$4 dump atomics
  dump=$(callgrind_requests "$name" "$port" "$pid")
  atomics=$(python3 bench/locked.py "$dump" "$binary")
  awk -v n="$REQUESTS" -v atomics="$atomics" '
    /^events:/ { for (i = 2; i <= NF; i++) at[$i] = i }
    /^(summary|totals):/ {
      printf "%d %.1f %.1f %.1f %.1f %.1f\n", $at["Ir"] / n, $at["I1mr"] / n,
        ($at["D1mr"] + $at["D1mw"]) / n,
        ($at["ILmr"] + $at["DLmr"] + $at["DLmw"]) / n, ($at["Bcm"] + $at["Bim"]) / n,
        atomics / n
      exit }' "$dump"
}

# cache LEVEL TYPE: callgrind's description of one of this machine's
# caches, "size,associativity,line size".
cache() {
  local dir
  for dir in /sys/devices/system/cpu/cpu0/cache/index*; do
    if [ "$(cat "$dir/level")" = "$1" ] && [ "$(cat "$dir/type")" = "$2" ]; then
      echo "$(($(sed 's/K$/ * 1024/; s/M$/ * 1048576/' "$dir/size"))),$(cat "$dir/ways_of_associativity"),$(cat "$dir/coherency_line_size")"
      return
    fi
  done
  echo "no level $1 $2 cache in /sys" >&2
  return 1
}

spike_port=$(free_port)
write_balancer_config "$work/balancer.toml" "$spike_port" "$(printf '[server]\nworkers = 1\n%s' "$CHECKS_OFF")"
SIMULATE=(--cache-sim=yes --I1="$(cache 1 Instruction)" --D1="$(cache 1 Data)" --LL="$(cache 2 Unified)"
  --branch-sim=yes --dump-instr=yes)
RUST_LOG=warn valgrind --tool=callgrind "${SIMULATE[@]}" --callgrind-out-file="$work/spike.out" \
  target/release/balancer --config "$work/balancer.toml" >/dev/null 2>"$work/spike.valgrind" &
spike_pid=$!
pids+=("$spike_pid")
spike=$(count spike "$spike_port" "$spike_pid" "$PWD/target/release/balancer")
kill "$spike_pid"

# nginx as bench/proxy.sh runs it, in one process so that callgrind sees
# all of its work.
nginx_port=$(free_port)
nginx_proxy_config 0 "$nginx_port" "${backend_ports[@]}" >"$work/nginx.conf"
valgrind --tool=callgrind "${SIMULATE[@]}" --callgrind-out-file="$work/nginx.out" \
  nginx -c "$work/nginx.conf" -e "$work/nginx-error.log" >/dev/null 2>"$work/nginx.valgrind" &
nginx_pid=$!
pids+=("$nginx_pid")
nginx=$(count nginx "$nginx_port" "$nginx_pid" "$(command -v nginx)")

echo "Machine: $(machine)"
echo "$(nginx -v 2>&1 | sed 's/^nginx version: //'); $REQUESTS keep-alive requests (ab -k -c $CONCURRENCY), 4 static backends, one worker each"
echo
echo "| proxy | instructions | L1 instruction misses | L1 data misses | L2 misses | mispredicted branches | atomic instructions |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for row in "spike balancer|$spike" "nginx|$nginx"; do
  # shellcheck disable=SC2086
  set -- ${row#*|}
  echo "| ${row%%|*} | $1 | $2 | $3 | $4 | $5 | $6 |"
done
echo "(per request)"
echo
read -r -a ours <<<"$spike"
read -r -a theirs <<<"$nginx"
awk -v a="${ours[*]}" -v b="${theirs[*]}" 'BEGIN {
  split(a, s, " "); split(b, n, " ")
  l2 = n[4] > 0 ? sprintf("%.2fx", s[4] / n[4]) : "none for nginx"
  printf "spike / nginx: instructions %.2fx, L1 instruction misses %.2fx, L1 data misses %.2fx, L2 misses %s, mispredicted branches %.2fx\n",
    s[1] / n[1], (n[2] > 0 ? s[2] / n[2] : 0), s[3] / n[3], l2, s[5] / n[5] }'
