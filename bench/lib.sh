# Helpers shared by the benchmark scripts: installing the tools, free ports,
# readiness, per-process CPU from /proc, and wrk runs reduced to medians.
# Sourced, not run.

# Installs a Debian package when its command is missing.
need() {
  local command=$1 package=${2:-$1}
  if ! command -v "$command" >/dev/null 2>&1; then
    if [ -z "${APT_UPDATED:-}" ]; then
      apt-get update -qq
      APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
  fi
}

# Sets $work to a new temporary directory and $pids to an empty list; on
# exit, every process in $pids is killed and $work removed.
make_workdir() {
  work=$(mktemp -d)
  pids=()
  trap 'for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
}

# Prints a loopback TCP port that nothing listens on, and that no earlier
# call in this script printed: ports handed out before anything binds them
# (a server's several ports, chosen first) would otherwise repeat.
free_port() {
  python3 - "$work/ports" <<'PY'
import os, socket, sys
taken = set(open(sys.argv[1]).read().split()) if os.path.exists(sys.argv[1]) else set()
while True:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
    s.close()
    if port not in taken:
        break
with open(sys.argv[1], "a") as f:
    f.write(port + "\n")
print(port)
PY
}

# Waits until something accepts connections on 127.0.0.1:$1.
wait_port() {
  local port=$1 i
  for i in $(seq 1 500); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.02
  done
  echo "nothing listens on port $port after 10s" >&2
  return 1
}

# start_static_backends COUNT: one nginx (1 worker) answering 200 "ok" on
# COUNT loopback ports, without an access log; sets backend_ports and
# backends_pid.
start_static_backends() {
  local port
  backend_ports=()
  for _ in $(seq 1 "$1"); do backend_ports+=("$(free_port)"); done
  {
    echo "worker_processes 1; daemon off; pid $work/backends.pid; error_log $work/backends-error.log;"
    # Room for all the connections that the proxies of a script open to
    # them (as many as a proxy has clients, each), accepted as fast as they
    # come: out of connections, or with its accept queue full, a backend
    # would leave a proxy's connects to time out and its upstreams rested.
    # At most 16,384 connections, and 64 files for the rest.
    local files most=$((16384 + 64))
    files=$(ulimit -Hn | sed "s/unlimited/$most/")
    files=$((files < most ? files : most))
    echo "worker_rlimit_nofile $files;"
    echo "events { worker_connections $((files - 64)); }"
    echo "http { access_log off; keepalive_requests 100000000;"
    for port in "${backend_ports[@]}"; do
      echo "  server { listen 127.0.0.1:$port backlog=4096; location / { return 200 'ok'; } }"
    done
    echo "}"
  } >"$work/backends.conf"
  nginx -c "$work/backends.conf" -e "$work/backends-error.log" &
  backends_pid=$!
  pids+=("$backends_pid")
  for port in "${backend_ports[@]}"; do wait_port "$port"; done
}

# nginx_proxy_config WORKERS LISTEN_PORT PORT...: prints the configuration
# of nginx as a weighted round-robin proxy (weights 1, 2, 3... in the order
# of the PORTs), with keep-alive to them and no access log, listening on
# LISTEN_PORT; WORKERS 0 is one process, master and worker in one (for
# callgrind to see all of its work). Each worker takes up to
# $MAX_CONNECTIONS connections (default 8192). It forwards what the
# balancer forwards, so that both do the same job: the client's Host,
# X-Forwarded-For (appended to), X-Forwarded-Proto and X-Forwarded-Host,
# and Via both ways (nginx's defaults send none of them, and Host as the
# upstream group's name). BARE=1 leaves them out, here and in HAProxy's.
nginx_proxy_config() {
  local workers=$1 listen=$2 weight=1 port connections=${MAX_CONNECTIONS:-8192}
  shift 2
  if [ "$workers" -eq 0 ]; then
    echo "master_process off; daemon off; pid $work/nginx.pid; error_log $work/nginx-error.log;"
  else
    echo "worker_processes $workers; daemon off; pid $work/nginx.pid; error_log $work/nginx-error.log;"
  fi
  echo "worker_rlimit_nofile $(ulimit -Hn | sed "s/unlimited/$((2 * connections + 1024))/");"
  echo "events { worker_connections $connections; }"
  echo "http { access_log off; keepalive_requests 100000000;"
  echo "  upstream nodes {"
  for port in "$@"; do
    echo "    server 127.0.0.1:$port weight=$weight;"
    weight=$((weight + 1))
  done
  echo "    keepalive 1024;"
  echo "  }"
  echo "  server { listen 127.0.0.1:$listen;"
  echo "    location / { proxy_pass http://nodes; proxy_http_version 1.1; proxy_set_header Connection \"\";"
  if [ "${BARE:-0}" != 1 ]; then
    echo "      proxy_set_header Host \$http_host;"
    echo "      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
    echo "      proxy_set_header X-Forwarded-Proto \$scheme;"
    echo "      proxy_set_header X-Forwarded-Host \$http_host;"
    echo "      proxy_set_header Via \"1.1 nginx\"; add_header Via \"1.1 nginx\" always;"
  fi
  echo "    }"
  echo "  }"
  echo "}"
}

# start_nginx_proxy WORKERS PORT...: nginx as nginx_proxy_config has it,
# on a free port; sets nginx_port and nginx_pid.
start_nginx_proxy() {
  local workers=$1
  shift
  nginx_port=$(free_port)
  nginx_proxy_config "$workers" "$nginx_port" "$@" >"$work/nginx.conf"
  nginx -c "$work/nginx.conf" -e "$work/nginx-error.log" &
  nginx_pid=$!
  pids+=("$nginx_pid")
  wait_port "$nginx_port"
}

# callgrind_requests NAME PORT PID: runs $REQUESTS keep-alive requests
# ($CONCURRENCY at a time, default 16) to PORT, after a warm-up of 2,000
# (connections pooled, allocator settled), with the callgrind counts of PID
# zeroed before and dumped after; fails unless every request succeeded,
# and prints the path of the dump.
callgrind_requests() {
  local name=$1 port=$2 pid=$3 concurrency=${CONCURRENCY:-16} dumps
  wait_port "$port"
  ab -q -k -n 2000 -c "$concurrency" "http://127.0.0.1:$port/" >/dev/null
  callgrind_control --zero "$pid" >/dev/null 2>&1
  ab -q -k -n "$REQUESTS" -c "$concurrency" "http://127.0.0.1:$port/" >"$work/$name.ab"
  callgrind_control --dump "$pid" >/dev/null 2>&1
  grep -q '^Failed requests: *0' "$work/$name.ab" || { cat "$work/$name.ab" >&2; return 1; }
  dumps=$(ls -t "$work/$name.out".*)
  echo "${dumps%%$'\n'*}"
}

# start_haproxy_proxy WORKERS PORT...: HAProxy as a weighted round-robin
# proxy (weights 1, 2, 3... in the order of the PORTs) with connection reuse
# to them and no log, on a free port; sets haproxy_port and haproxy_pid. It
# takes up to $MAX_CONNECTIONS connections (default 4096), and forwards
# what the balancer forwards unless BARE=1 (see nginx_proxy_config).
start_haproxy_proxy() {
  local workers=$1 weight=1 port
  shift
  haproxy_port=$(free_port)
  {
    echo "global"
    echo "  nbthread $workers"
    echo "  maxconn ${MAX_CONNECTIONS:-4096}"
    echo "defaults"
    echo "  mode http"
    echo "  timeout connect 1s"
    echo "  timeout client 60s"
    echo "  timeout server 30s"
    echo "  http-reuse always"
    echo "frontend proxy"
    echo "  bind 127.0.0.1:$haproxy_port"
    echo "  default_backend nodes"
    echo "backend nodes"
    echo "  balance roundrobin"
    if [ "${BARE:-0}" != 1 ]; then
      # What the balancer forwards (see nginx_proxy_config).
      echo "  option forwardfor"
      echo "  http-request set-header X-Forwarded-Proto http"
      echo "  http-request set-header X-Forwarded-Host %[req.hdr(host)]"
      echo "  http-request add-header Via \"1.1 haproxy\""
      echo "  http-response add-header Via \"1.1 haproxy\""
    fi
    for port in "$@"; do
      echo "  server s$weight 127.0.0.1:$port weight $weight"
      weight=$((weight + 1))
    done
  } >"$work/haproxy.cfg"
  haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
  haproxy_pid=$!
  pids+=("$haproxy_pid")
  wait_port "$haproxy_port"
}

# The balancer's settings that turn its health checks off, active and
# passive.
CHECKS_OFF=$'[health]\nenabled = false\nmax_fails = 0'

# write_balancer_config FILE PORT EXTRA_TOML: a balancer.toml listening on
# PORT with the backends of start_static_backends, weighted 1, 2, 3...
write_balancer_config() {
  local file=$1 port=$2 extra=$3 weight=1 backend
  {
    echo "listen = \"127.0.0.1:$port\""
    echo "admin = \"127.0.0.1:$(free_port)\""
    for backend in "${backend_ports[@]}"; do
      printf '\n[[upstream]]\naddr = "127.0.0.1:%s"\nweight = %s\n' "$backend" "$weight"
      weight=$((weight + 1))
    done
    printf '\n%s\n' "$extra"
  } >"$file"
}

# Prints the CPU time (user + system) of the given pids, in clock ticks.
cpu_ticks() {
  local total=0 pid fields
  for pid in "$@"; do
    read -r -a fields <"/proc/$pid/stat"
    # Fields 14 and 15 (utime, stime), counted after the parenthesised name.
    total=$((total + fields[13] + fields[14]))
  done
  echo "$total"
}

# A pid and its children (nginx and haproxy keep their workers as children).
with_children() {
  local pid=$1
  echo "$pid" $(pgrep -P "$pid" || true)
}

# Prints the user-space CPU time of the given pids, in clock ticks.
user_ticks() {
  local total=0 pid fields
  for pid in "$@"; do
    read -r -a fields <"/proc/$pid/stat"
    total=$((total + fields[13]))
  done
  echo "$total"
}

# wrk_once URL PIDS...: one wrk run of $DURATION seconds at $CONNECTIONS
# connections; prints "requests_per_sec p50_ms p99_ms cpu_us_per_request
# user_us_per_request", the CPU being that of PIDS during the run (user +
# system, then user space alone).
wrk_once() {
  local url=$1
  shift
  local before after user_before user_after out requests rps p50 p99 hz
  hz=$(getconf CLK_TCK)
  before=$(cpu_ticks "$@")
  user_before=$(user_ticks "$@")
  out=$(wrk -t "${THREADS:-1}" -c "$CONNECTIONS" -d "${DURATION}s" --latency "$url")
  after=$(cpu_ticks "$@")
  user_after=$(user_ticks "$@")
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  echo "$rps $(to_ms "$p50") $(to_ms "$p99") $(awk -v t=$((after - before)) -v u=$((user_after - user_before)) -v hz="$hz" -v n="$requests" 'BEGIN {printf "%.1f %.1f", t * 1e6 / hz / n, u * 1e6 / hz / n}')"
}

# wrk's latencies carry a unit (us, ms, s); prints milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else { sub(/s$/, "", v); printf "%.3f", v * 1000 }
  }'
}

# compare TARGET...: each TARGET is "name|url|pid pid ...". Runs wrk on
# every target in turn, $RUNS rounds (interleaved, so that a noisy moment
# of a shared machine does not fall on one target only), and fills the
# associative array MEDIANS: name -> "requests_per_sec p50_ms p99_ms
# cpu_us_per_request user_us_per_request", each the median over the rounds.
declare -A MEDIANS
compare() {
  local -A rows=()
  local round target name url pids
  for round in $(seq 1 "$RUNS"); do
    for target in "$@"; do
      IFS='|' read -r name url pids <<<"$target"
      # shellcheck disable=SC2086 # pids is a list
      rows[$name]+="$(wrk_once "$url" $pids)"$'\n'
    done
  done
  for target in "$@"; do
    name=${target%%|*}
    MEDIANS[$name]=$(printf '%s' "${rows[$name]}" | python3 -c '
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.stdin if line.strip()]
print(" ".join(f"{statistics.median(col):.3f}" for col in zip(*rows)))')
  done
}

# Prints a description of the machine.
machine() {
  local model
  model=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
  echo "$(nproc) cores (${model:-unknown CPU}), $(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
}

# spike_up_sale TOTAL: a configuration directory in $work/config for
# `spike up` on free loopback ports (a sale of TOTAL tickets, four
# upstreams weighted 1 to 4, the order service; the nodes' `sched_batch`
# is $SCHED_BATCH, true by default, and the balancer's `pipeline_depth`
# $PIPELINE_DEPTH, 16 by default, as shipped), then `spike up` on it,
# waited for; sets redis_port, proxy_port, admin_port, orders_admin_port,
# node_ports and spike_pid, and the pids spike up started: balancer_pid,
# node_pids, redis_pid and orders_pid; the children's logs go to $work/log.
spike_up_sale() {
  local total=$1 weight
  mkdir -p "$work/config"
  redis_port=$(free_port)
  proxy_port=$(free_port)
  admin_port=$(free_port)
  orders_admin_port=$(free_port)
  printf 'redis_url = "redis://127.0.0.1:%s"\ntotal_stock = %s\nstat_log = ""\nsched_batch = %s\n' \
    "$redis_port" "$total" "${SCHED_BATCH:-true}" >"$work/config/node.toml"
  {
    echo "listen = \"127.0.0.1:$proxy_port\""
    echo "admin = \"127.0.0.1:$admin_port\""
    for weight in 1 2 3 4; do
      printf '\n[[upstream]]\naddr = "127.0.0.1:%s"\nweight = %s\n' "$(free_port)" "$weight"
    done
    printf '\n[proxy]\npipeline_depth = %s\n' "${PIPELINE_DEPTH:-16}"
  } >"$work/config/balancer.toml"
  echo "admin = \"127.0.0.1:$orders_admin_port\"" >"$work/config/orders.toml"
  node_ports=($(awk -F'[:"]' '/^addr/ {print $3}' "$work/config/balancer.toml"))
  target/release/spike up --config-dir "$work/config" --log-dir "$work/log" \
    --data-dir "$work/data" >"$work/spike.out" 2>&1 &
  spike_pid=$!
  pids+=("$spike_pid")
  for _ in $(seq 1 600); do
    grep -q '^ready:' "$work/spike.out" && break
    sleep 0.1
  done
  grep -q '^ready:' "$work/spike.out" || { cat "$work/spike.out" >&2; exit 1; }
  balancer_pid=$(awk '/started the balancer/ {gsub(/[^0-9]/, "", $7); print $7}' "$work/spike.out")
  node_pids=($(awk '/started node-/ {sub(/.*\(pid /, ""); sub(/,.*/, ""); print}' "$work/spike.out"))
  redis_pid=$(awk '/started redis-server/ {sub(/.*\(pid /, ""); sub(/\).*/, ""); print}' "$work/spike.out")
  orders_pid=$(awk '/started the order service/ {sub(/.*\(pid /, ""); sub(/\).*/, ""); print}' "$work/spike.out")
}

# new_sale: the same nodes of spike_up_sale, the sale started over, each
# node waited for until it has seen so.
new_sale() {
  local port
  target/release/spike reset --config-dir "$work/config" >/dev/null
  for port in "${node_ports[@]}"; do
    for _ in $(seq 1 100); do
      curl -fsS "http://127.0.0.1:$port/stats" | grep -q '"global_sold_out":false' && break
      sleep 0.05
    done
  done
}

# per_request TICKS: CPU clock ticks as microseconds per request, of
# $REQUESTS requests.
per_request() {
  awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v n="$REQUESTS" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}'
}

# ab_run OUT ARGS...: runs `ab ARGS...`, its report to OUT; prints ab's own
# CPU (user and system) in microseconds per request, of $REQUESTS requests.
ab_run() {
  local out=$1
  shift
  (
    ab "$@" >"$out"
    times >"$out.times" # not piped: a pipe would run it in a child
  )
  awk -v n="$REQUESTS" 'NR == 2 {gsub(/[ms]/, " "); printf "%.1f", ($1 * 60 + $2 + $3 * 60 + $4) * 1e6 / n}' "$out.times"
}

# sale_run NAME [COUNTER...]: one run of `ab -k -l` ($REQUESTS purchases
# from $CONCURRENCY clients) through the balancer of spike_up_sale, its
# report in $work/NAME.ab; prints "requests_per_sec p99_ms balancer_cpu
# nodes_cpu ab_cpu" (CPU in microseconds per request), then how much each
# COUNTER (a command printing a number, run before and after) grew per
# request.
sale_run() {
  local name=$1 balancer_before nodes_before ab_cpu counter grown i=0 counted=() line
  shift
  balancer_before=$(cpu_ticks "$balancer_pid")
  nodes_before=$(cpu_ticks "${node_pids[@]}")
  for counter in "$@"; do counted+=("$(eval "$counter")"); done
  ab_cpu=$(ab_run "$work/$name.ab" -q -k -l -r -n "$REQUESTS" -c "$CONCURRENCY" \
    "http://127.0.0.1:$proxy_port/buy/ticket")
  line="$(awk '/^Requests per second:/ {print $4}' "$work/$name.ab")"
  line+=" $(awk '$1 == "99%" {print $2}' "$work/$name.ab")"
  line+=" $(per_request $(($(cpu_ticks "$balancer_pid") - balancer_before)))"
  line+=" $(per_request $(($(cpu_ticks "${node_pids[@]}") - nodes_before)))"
  line+=" $ab_cpu"
  for counter in "$@"; do
    grown=$(($(eval "$counter") - counted[i]))
    i=$((i + 1))
    line+=" $(awk -v d="$grown" -v n="$REQUESTS" 'BEGIN {printf "%.3f", d / n}')"
  done
  echo "$line"
}

# An awk function: the median of a[1..n] (sorts a).
MEDIAN_AWK='
  function median(a, n,   i, j, t) {
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }'

