#!/usr/bin/env bash
# User-space work per proxied request, counted in instructions: this
# balancer (one worker) and nginx (one process) each run under callgrind
# and proxy the same keep-alive requests from ab to the same four static
# backends, weighted 1 to 4, health checks off. Instruction counts repeat
# run after run whatever else the machine is doing, which the user-space
# CPU time of bench/proxy.sh on a shared machine does not; they do not
# count the kernel's work, nor how fast the instructions run.
#
#   bash bench/instructions.sh          # REQUESTS=20000 CONCURRENCY=16
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

REQUESTS=${REQUESTS:-20000}
CONCURRENCY=${CONCURRENCY:-16}

need valgrind
need callgrind_control valgrind
need nginx
need ab apache2-utils
need python3
cargo build --release --quiet --bin balancer

make_workdir
start_static_backends 4

# count NAME PORT PID: the instructions PID ran per request over $REQUESTS
# requests to PORT, after a warm-up; callgrind writes to $work/NAME.out.
count() {
  local name=$1 port=$2 pid=$3 dump total
  wait_port "$port"
  ab -q -k -n 2000 -c "$CONCURRENCY" "http://127.0.0.1:$port/" >/dev/null
  callgrind_control --zero "$pid" >/dev/null 2>&1
  ab -q -k -n "$REQUESTS" -c "$CONCURRENCY" "http://127.0.0.1:$port/" >"$work/$name.ab"
  callgrind_control --dump "$pid" >/dev/null 2>&1
  grep -q '^Failed requests: *0' "$work/$name.ab" || { cat "$work/$name.ab" >&2; exit 1; }
  dump=$(ls -t "$work/$name.out".* | head -n 1)
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  echo $((total / REQUESTS))
}

spike_port=$(free_port)
write_balancer_config "$work/balancer.toml" "$spike_port" "$(printf '[server]\nworkers = 1\n%s' "$CHECKS_OFF")"
RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/spike.out" \
  target/release/balancer --config "$work/balancer.toml" >/dev/null 2>"$work/spike.valgrind" &
spike_pid=$!
pids+=("$spike_pid")
spike=$(count spike "$spike_port" "$spike_pid")
kill "$spike_pid"

# nginx as bench/proxy.sh runs it, in one process so that callgrind sees
# all of its work.
nginx_port=$(free_port)
{
  echo "master_process off; daemon off; pid $work/nginx.pid; error_log $work/nginx-error.log;"
  echo "events { worker_connections 4096; }"
  echo "http { access_log off; keepalive_requests 100000000;"
  echo "  upstream nodes {"
  weight=1
  for port in "${backend_ports[@]}"; do
    echo "    server 127.0.0.1:$port weight=$weight;"
    weight=$((weight + 1))
  done
  echo "    keepalive 1024;"
  echo "  }"
  echo "  server { listen 127.0.0.1:$nginx_port;"
  echo "    location / { proxy_pass http://nodes; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
  echo "  }"
  echo "}"
} >"$work/nginx.conf"
valgrind --tool=callgrind --callgrind-out-file="$work/nginx.out" \
  nginx -c "$work/nginx.conf" -e "$work/nginx-error.log" >/dev/null 2>"$work/nginx.valgrind" &
nginx_pid=$!
pids+=("$nginx_pid")
nginx=$(count nginx "$nginx_port" "$nginx_pid")

echo "Machine: $(machine)"
echo "$(nginx -v 2>&1 | sed 's/^nginx version: //'); $REQUESTS keep-alive requests (ab -k -c $CONCURRENCY), 4 static backends, one worker each"
echo
echo "| proxy | instructions per request |"
echo "|---|---:|"
echo "| spike balancer | $spike |"
echo "| nginx | $nginx |"
echo
awk -v s="$spike" -v n="$nginx" 'BEGIN { printf "spike / nginx: %.2fx\n", s / n }'
