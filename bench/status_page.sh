#!/usr/bin/env bash
# A picture of the balancer's status page during a sale, for the README:
# `spike up` (four nodes weighted 1 to 4), named buyers from `spike load`,
# `ab` in the background, one node drained from the admin API, and headless
# Chromium (through chromedriver's WebDriver API) taking the screenshot once
# the page has polled for a few seconds of real time.
#
#   bash bench/status_page.sh     # writes bench/results/status-page.png
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

need ab apache2-utils
need redis-server
need curl
need chromium
need chromedriver chromium-driver
need python3
cargo build --release --quiet --bin spike

make_workdir
mkdir -p bench/results
spike_up_sale 10000

target/release/spike load --url "http://127.0.0.1:$proxy_port" --buyers 20000 --concurrency 100 \
  --pay 0.7 --json >/dev/null
ab -k -l -q -t 30 -n 10000000 -c 100 "http://127.0.0.1:$proxy_port/buy/ticket" >/dev/null 2>&1 &
ab_pid=$!
pids+=("$ab_pid")
curl -fsS -X POST -H 'Content-Type: application/json' \
  "http://127.0.0.1:$admin_port/upstreams/127.0.0.1:${node_ports[2]}/drain" >/dev/null
driver_port=$(free_port)
TMPDIR="$work" chromedriver --port="$driver_port" >"$work/chromedriver.log" 2>&1 &
pids+=("$!")
wait_port "$driver_port"
webdriver() { # METHOD PATH [JSON]
  curl -fsS -X "$1" -H 'Content-Type: application/json' ${3:+-d "$3"} "http://127.0.0.1:$driver_port$2"
}
session=$(webdriver POST /session '{"capabilities":{"alwaysMatch":{"goog:chromeOptions":{"args":
  ["--headless=new","--no-sandbox","--disable-gpu","--hide-scrollbars","--window-size=1500,900"]}}}}' |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["value"]["sessionId"])')
webdriver POST "/session/$session/url" "{\"url\":\"http://127.0.0.1:$admin_port/\"}" >/dev/null
sleep 6   # the page's rates and chart come from its polls, once a second
webdriver GET "/session/$session/screenshot" |
  python3 -c 'import base64, json, sys; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)["value"]))' \
  >"$work/status-page.png"
webdriver DELETE "/session/$session" >/dev/null
kill "$ab_pid" 2>/dev/null || true
cp "$work/status-page.png" bench/results/status-page.png
echo "bench/results/status-page.png"
