#!/usr/bin/env bash
# System calls per request of the balancer and of nginx, proxying to the
# same four static backends: each proxy (2 workers) is traced with
# `strace -c -f` through one wrk run, and the calls that carry a request
# (reads, writes, epoll_wait) are divided by the requests wrk made. The
# trace slows both proxies down alike; only the counts are read.
#
#   bash bench/syscalls.sh          # CONNECTIONS=1000 DURATION=5
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

CONNECTIONS=${CONNECTIONS:-1000}
DURATION=${DURATION:-5}

need wrk
need nginx
need strace
need python3
cargo build --release --quiet --bin balancer

make_workdir
# The traces go beside, not into, the folder the balancer's configuration
# is in: the balancer watches that folder.
traces=$(mktemp -d)
trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work" "$traces"' EXIT

start_static_backends 4
spike_port=$(free_port)
write_balancer_config "$work/balancer.toml" "$spike_port" "$(printf '[server]\nworkers = 2\n%s' "$CHECKS_OFF")"
RUST_LOG=warn target/release/balancer --config "$work/balancer.toml" >/dev/null &
spike_pid=$!
pids+=("$spike_pid")
wait_port "$spike_port"
start_nginx_proxy 2 "${backend_ports[@]}"

# trace NAME PORT PIDS...: traces PIDS through one wrk run on PORT, after
# a warm-up run; prints "requests reads writes epoll_waits".
trace() {
  local name=$1 port=$2 strace_pid requests
  shift 2
  wrk -t1 -c "$CONNECTIONS" -d 2s "http://127.0.0.1:$port/" >/dev/null
  local attach=()
  for pid in "$@"; do attach+=(-p "$pid"); done
  strace -c -f -o "$traces/$name" "${attach[@]}" 2>/dev/null &
  strace_pid=$!
  sleep 1
  requests=$(wrk -t1 -c "$CONNECTIONS" -d "${DURATION}s" "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  kill -INT "$strace_pid"
  wait "$strace_pid" 2>/dev/null || true
  awk -v n="$requests" '
    $NF ~ /^(read|readv|recvfrom|recvmsg)$/ { reads += $4 }
    $NF ~ /^(write|writev|sendto|sendmsg)$/ { writes += $4 }
    $NF == "epoll_wait" || $NF == "epoll_pwait" { waits += $4 }
    END { print n, reads + 0, writes + 0, waits + 0 }' "$traces/$name"
}

read -r spike_n spike_r spike_w spike_e < <(trace spike "$spike_port" "$spike_pid")
# shellcheck disable=SC2046
read -r nginx_n nginx_r nginx_w nginx_e < <(trace nginx "$nginx_port" $(pgrep -P "$nginx_pid"))

echo "Machine: $(machine)"
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s under strace -c -f; 2 workers per proxy; 4 static backends"
echo
echo "| proxy | requests | reads per request | writes per request | requests per epoll_wait |"
echo "|---|---:|---:|---:|---:|"
for row in "spike $spike_n $spike_r $spike_w $spike_e" "nginx $nginx_n $nginx_r $nginx_w $nginx_e"; do
  # shellcheck disable=SC2086
  set -- $row
  awk -v name="$1" -v n="$2" -v r="$3" -v w="$4" -v e="$5" 'BEGIN {
    printf "| %s | %d | %.2f | %.2f | %.1f |\n", name, n, r / n, w / n, (e > 0 ? n / e : 0) }'
done
