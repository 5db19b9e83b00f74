#!/usr/bin/env bash
# The whole system on one machine, with no accounts and nothing to install but touchctl: applies
# the sample touchpoints to a registry of its own, starts the daemon and the sandbox (which stands
# in for WeChat, its open platform, WeCom and Getui, and serves the custom touchpoints' webhook
# sinks), binds the sample service account through the open platform as its administrator would,
# sends one campaign to each of the six sample touchpoints, and shows what each platform received.
# Everything it starts is stopped, and everything it writes removed, when it ends.
#
#     examples/demo/run.sh            (from the repository root, with touchctl on the PATH)
#
# The samples point their api_base at the sandbox on 127.0.0.1:8641; the daemon listens on
# 127.0.0.1:8640. Both must be free.
set -euo pipefail
cd "$(dirname "$0")/../.."

work=$(mktemp -d "${TMPDIR:-/tmp}/touchctl-demo.XXXXXX")
pids=()
# The binding writes the service account's refresh token where its file says; the demo's is
# removed at the end, unless one was there before.
refresh_token=secrets/sandbox/wechat_service_refresh_token
[ -e "$refresh_token" ] && keep_token=1 || keep_token=0
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
    [ "$keep_token" = 1 ] || rm -f "$refresh_token"
}
trap cleanup EXIT

# Waits until file $1 has a line matching $2, for up to 30 s; shows the file if it never does.
wait_for() {
    for _ in $(seq 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "error: gave up waiting for \"$2\"; its log:" >&2
    cat "$1" >&2
    exit 1
}

state="$work/state.db"
echo "== 1. validate and apply the sample touchpoints (registry $state)"
touchctl validate -q
touchctl apply --auto-approve --allow-dirty -q --state "$state"

echo "== 2. start the daemon and the sandbox"
# A token for the daemon's API, made for the occasion (64 hex digits).
TOUCHCTL_API_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export TOUCHCTL_API_TOKEN TOUCHCTL_URL=http://127.0.0.1:8640
touchctl daemon --state "$state" --listen 127.0.0.1:8640 --allow-private-network \
    >"$work/daemon.log" 2>&1 &
pids+=($!)
wait_for "$work/daemon.log" "listening on"
echo "daemon: listening on $TOUCHCTL_URL"
# The sandbox pushes the open platform's verify ticket to the daemon, as WeChat does every 10 minutes.
touchctl sandbox --listen 127.0.0.1:8641 \
    --push-tickets-to "$TOUCHCTL_URL/wechat/platforms/{platform}/events" >"$work/sandbox.log" 2>&1 &
pids+=($!)
wait_for "$work/sandbox.log" "listening on"
sed -n 's/^touchctl sandbox: /sandbox: /p' "$work/sandbox.log"
wait_for "$work/daemon.log" "verify ticket received"
echo "daemon: verify ticket of open-platform received"

echo "== 3. bind the service account through the open platform (touchctl auth wechat)"
touchctl auth wechat wechat-service >"$work/binding.txt" 2>&1 &
binding=$!
wait_for "$work/binding.txt" "^PC URL: "
# What the account's administrator does in a browser: open the link, press 授权.
touchctl sandbox authorise "$(sed -n 's/^PC URL: //p' "$work/binding.txt")" >/dev/null
wait "$binding"
grep -E '^(Bound|Granted|Every)' "$work/binding.txt"

echo "== 4. send campaign member-day to three users through each touchpoint"
users=examples/demo/users.ndjson
# Each waits until its dispatch has finished and prints the last progress line.
send() {
    local touchpoint=$1
    shift
    printf '%-15s ' "$touchpoint"
    touchctl dispatch --touchpoint "$touchpoint" --campaign member-day --users "$users" --wait "$@" \
        2>&1 >/dev/null | tail -n 1
}
send sms --param text="【品牌】会员日满100减20"
send loyalty-points --param-json points=200
send wechat-oa --template order_shipped --param first="{{nickname}}，您的订单已发货" \
    --param keyword1=SF1234567890 --param keyword2=顺丰速运 --param remark=点击查看物流详情
send wechat-service --template points_expiring --param first="{{nickname}}，您的积分即将到期" \
    --param keyword1=200 --param keyword2=2026-12-31 --param remark=点击查看积分
send wecom-stores --template new_arrivals --param title=新品到店 \
    --param description=本周新品已上架，欢迎到店体验
send app-push --body "会员日满100减20，今天有效"

echo "== 5. what the platforms received (touchctl sandbox messages)"
touchctl sandbox messages --url http://127.0.0.1:8641
