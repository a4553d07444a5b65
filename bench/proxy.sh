#!/usr/bin/env bash
# The balancer beside nginx and HAProxy as weighted round-robin proxies, in
# one run on one machine, over the same four static backends.
#
#   bash bench/proxy.sh           # DURATION=10 CONNECTIONS=64 RUNS=3 WORKERS=2 THREADS=1
#   BASELINE=/tmp/balancer bash bench/proxy.sh   # and another build beside it
#
# THREADS is wrk's (-t): one wrk thread is itself most of a core at 64
# connections here, so THREADS=2 shows the proxies with the client spread
# over both cores.
#
# - backends: one nginx (1 worker) answering a fixed 200 on four ports;
# - direct: wrk straight at one backend, the ceiling;
# - spike: this balancer, weights 1-4, WORKERS runtime threads, health
#   checks on (as shipped); "spike, checks off" the same without them;
# - nginx: `upstream` with weight=1..4, WORKERS worker processes, keepalive
#   to the backends;
# - haproxy: `balance roundrobin`, weight 1..4, WORKERS threads, connection
#   reuse to the backends;
# - baseline, if BASELINE names a balancer binary (another commit's build):
#   it, as "spike" is run, in the same rounds, to measure a change.
# No proxy writes an access log. Prints the medians over RUNS of requests/s,
# p50 and p99 latency and the proxy's CPU microseconds per request (user +
# system, all its processes, from /proc, and the user-space part of it),
# then this balancer's ratios to nginx and HAProxy, and the lowest CPU ratio
# to nginx that any proxy doing nginx's kernel work could reach here.
set -euo pipefail
BASELINE=${BASELINE:+$(realpath "$BASELINE")}
cd "$(dirname "$0")/.."
source bench/lib.sh

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
RUNS=${RUNS:-3}
WORKERS=${WORKERS:-2}

need wrk
need nginx
need haproxy
need python3
cargo build --release --quiet --bin balancer

make_workdir

start_static_backends 4

# This balancer, with its health checks (as shipped), and without: active
# checks off and max_fails = 0.
# start_spike NAME EXTRA_TOML: sets spike_port and spike_pid.
start_spike() {
  spike_port=$(free_port)
  write_balancer_config "$work/$1.toml" "$spike_port" "$(printf '[server]\nworkers = %s\n%s' "$WORKERS" "$2")"
  RUST_LOG=warn "${3:-target/release/balancer}" --config "$work/$1.toml" >/dev/null &
  spike_pid=$!
  pids+=("$spike_pid")
  wait_port "$spike_port"
}
start_spike unchecked "$CHECKS_OFF"
unchecked_port=$spike_port unchecked_pid=$spike_pid
targets=()
if [ -n "${BASELINE:-}" ]; then
  start_spike baseline "" "$BASELINE"
  targets+=("baseline|http://127.0.0.1:$spike_port/|$spike_pid")
fi
start_spike spike ""

# nginx as a proxy.
start_nginx_proxy "$WORKERS" "${backend_ports[@]}"

start_haproxy_proxy "$WORKERS" "${backend_ports[@]}"

echo "Machine: $(machine)"
echo "$(nginx -v 2>&1 | sed 's/^nginx version: //'), $(haproxy -v | head -1 | cut -d' ' -f1-3)"
echo "wrk -t${THREADS:-1} -c$CONNECTIONS -d${DURATION}s, median of $RUNS interleaved runs; $WORKERS workers per proxy"
echo
printf '| %-17s | %10s | %8s | %8s | %14s | %10s |\n' target "req/s" "p50 ms" "p99 ms" "CPU us/req" "of it user"
printf '|%s|%s|%s|%s|%s|%s|\n' ------------------- ------------ ---------- ---------- ---------------- ------------

compare "direct|http://127.0.0.1:${backend_ports[0]}/|$backends_pid" \
  "spike|http://127.0.0.1:$spike_port/|$spike_pid" \
  "spike, checks off|http://127.0.0.1:$unchecked_port/|$unchecked_pid" \
  "nginx|http://127.0.0.1:$nginx_port/|$(with_children "$nginx_pid")" \
  "haproxy|http://127.0.0.1:$haproxy_port/|$haproxy_pid" "${targets[@]}"
for name in direct spike "spike, checks off" nginx haproxy ${BASELINE:+baseline}; do
  read -r rps p50 p99 cpu user <<<"${MEDIANS[$name]}"
  [ "$name" = direct ] && cpu=- user=-
  printf '| %-17s | %10.0f | %8.2f | %8.2f | %14s | %10s |\n' "$name" "$rps" "$p50" "$p99" "$cpu" "$user"
done
echo
read -r s_rps _ s_p99 s_cpu s_user <<<"${MEDIANS[spike]}"
read -r _ _ _ u_cpu _ <<<"${MEDIANS[spike, checks off]}"
awk -v on="$s_cpu" -v off="$u_cpu" 'BEGIN {
  printf "health checks on / off: CPU per request %+.1f%% (wall clock, noisy; bench/health_cost.sh counts instructions)\n", (on / off - 1) * 100
}'
for name in nginx haproxy ${BASELINE:+baseline}; do
  read -r rps _ p99 cpu user <<<"${MEDIANS[$name]}"
  awk -v name="$name" -v sc="$s_cpu" -v oc="$cpu" -v su="$s_user" -v ou="$user" -v sr="$s_rps" -v or="$rps" -v sp="$s_p99" -v op="$p99" 'BEGIN {
    printf "spike / %-7s: CPU per request %.2fx (user space %.2fx, kernel %.2fx), throughput %.2fx, p99 %.2fx\n", name, sc / oc, su / ou, (sc - su) / (oc - ou), sr / or, sp / op
  }'
done
# Most of a proxied request's CPU is the kernel's: on loopback each socket
# write also runs the receiving side's TCP work. A proxy with nginx's kernel
# work per request and none at all in user space would be at this ratio.
read -r _ _ _ n_cpu n_user <<<"${MEDIANS[nginx]}"
awk -v c="$n_cpu" -v u="$n_user" 'BEGIN {
  printf "floor: nginx spends %.1f of its %.1f us per request in the kernel; the same kernel work with no user-space work at all would be %.2fx nginx'"'"'s CPU\n", c - u, c, (c - u) / c
}'
