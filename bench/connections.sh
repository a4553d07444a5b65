#!/usr/bin/env bash
# Memory per idle keep-alive client connection: the balancer beside nginx
# and HAProxy, each holding COUNT connections that have each made one
# request through it to the same static backends.
#
#   bash bench/connections.sh     # COUNT=10000 RUNS=3 WORKERS=2
#
# Each round starts every proxy afresh, warms it up with a short wrk run,
# reads its proportional set size (PSS, all its processes, from
# /proc/PID/smaps_rollup), opens COUNT connections with bench/hold.py (one
# GET each, answered, then idle), reads its PSS at once and again after the
# connections have been idle for IDLE seconds (default 2), and stops it.
# Prints the medians over RUNS of the memory and of the growth per idle
# connection, then this balancer's ratio to the others. Kernel socket
# buffers are not in any process's PSS, and are the same for all.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

COUNT=${COUNT:-10000}
RUNS=${RUNS:-3}
IDLE=${IDLE:-2}
WORKERS=${WORKERS:-2}
export MAX_CONNECTIONS=$((COUNT + 1024))

need wrk
need nginx
need haproxy
need python3
need ss iproute2
cargo build --release --quiet --bin balancer
# Every connection is a descriptor, in the holder and in the proxy.
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt $((COUNT + 1024)) ]; then
  echo "the open-file limit ($(ulimit -Hn)) is too low for $COUNT connections" >&2
  exit 1
fi
ulimit -n "$(ulimit -Hn)"

make_workdir
start_static_backends 4

# Prints the PSS of the given pids, in KiB.
pss_kib() {
  local pid total=0
  for pid in "$@"; do
    total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")))
  done
  echo "$total"
}

# start TARGET: starts it; sets port and target_pids.
start() {
  case $1 in
    spike)
      port=$(free_port)
      write_balancer_config "$work/balancer.toml" "$port" \
        "$(printf '[server]\nworkers = %s\nmax_connections = %s\n' "$WORKERS" "$MAX_CONNECTIONS")"
      RUST_LOG=warn target/release/balancer --config "$work/balancer.toml" >/dev/null &
      target_pids=$!
      pids+=("$target_pids")
      wait_port "$port"
      ;;
    nginx)
      start_nginx_proxy "$WORKERS" "${backend_ports[@]}"
      port=$nginx_port
      target_pids=$(with_children "$nginx_pid")
      ;;
    haproxy)
      start_haproxy_proxy "$WORKERS" "${backend_ports[@]}"
      port=$haproxy_port
      target_pids=$haproxy_pid
      ;;
  esac
}

# measure TARGET: one round; prints "KiB_before KiB_answered KiB_idle".
measure() {
  local before answered idle held ok leader
  start "$1"
  leader=${target_pids%% *}
  wrk -t1 -c64 -d2s "http://127.0.0.1:$port/" >/dev/null
  # shellcheck disable=SC2086 # target_pids is a list
  before=$(pss_kib $target_pids)
  rm -f "$work/hold.in" "$work/hold.out"
  mkfifo "$work/hold.in"
  python3 bench/hold.py "$port" "$COUNT" <"$work/hold.in" >"$work/hold.out" &
  local holder=$!
  exec 9>"$work/hold.in"
  until [ -s "$work/hold.out" ]; do
    kill -0 "$holder" 2>/dev/null || { echo "bench/hold.py failed against $1" >&2; exit 1; }
    sleep 0.1
  done
  read -r _ held ok <"$work/hold.out"
  if [ "$held" != "$COUNT" ] || [ "$ok" != "$COUNT" ]; then
    echo "$1: $ok of $held connections answered 200, not $COUNT" >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  answered=$(pss_kib $target_pids)
  sleep "$IDLE"
  # shellcheck disable=SC2086
  idle=$(pss_kib $target_pids)
  exec 9>&-
  wait "$holder"
  kill "$leader"
  wait "$leader" 2>/dev/null || true
  echo "$before $answered $idle"
}

# HAProxy reserves two descriptors per connection it may take.
targets=(spike nginx)
if [ "$(ulimit -Hn)" = unlimited ] || [ "$(ulimit -Hn)" -ge $((2 * MAX_CONNECTIONS + 1024)) ]; then
  targets+=(haproxy)
else
  echo "HAProxy skipped: it needs $((2 * MAX_CONNECTIONS + 1024)) open files for $COUNT connections; the limit here is $(ulimit -Hn)"
fi

echo "Machine: $(machine)"
echo "$(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3)"
echo "$COUNT idle keep-alive connections, each after one request; median of $RUNS rounds; $WORKERS workers per proxy"
echo
declare -A rows
for _ in $(seq 1 "$RUNS"); do
  for target in "${targets[@]}"; do
    rows[$target]+="$(measure "$target")"$'\n'
  done
done
declare -A per_conn
printf '| %-8s | %10s | %16s | %16s | %12s |\n' proxy "PSS" "just answered" "idle ${IDLE} s" "per idle connection"
printf '|%s|%s|%s|%s|%s|\n' ---------- ------------ ------------------ ------------------ --------------
for target in "${targets[@]}"; do
  read -r before answered idle per <<<"$(printf '%s' "${rows[$target]}" | python3 -c '
import statistics, sys
rows = [list(map(int, line.split())) for line in sys.stdin if line.strip()]
columns = [statistics.median(column) for column in zip(*rows)]
per = statistics.median((r[2] - r[0]) * 1024 / '"$COUNT"' for r in rows)
print(*(f"{c / 1024:.1f}" for c in columns), f"{per:.0f}")')"
  per_conn[$target]=$per
  printf '| %-8s | %6s MiB | %12s MiB | %12s MiB | %12s B |\n' "$target" "$before" "$answered" "$idle" "$per"
done
echo
for target in "${targets[@]:1}"; do
  awk -v name="$target" -v s="${per_conn[spike]}" -v o="${per_conn[$target]}" 'BEGIN {
    printf "spike / %-7s: memory per idle connection %.2fx\n", name, s / o
  }'
done
