#!/usr/bin/env bash
# Network impairment relay: two network namespaces, "edge" (10.77.0.1) and "cloud"
# (10.77.0.2), each with a TUN device; tools/impair (a userspace forwarder in the root
# namespace) relays IP packets between them with delay, jitter, rate limit and loss.
# This kernel has no netem qdisc; see docs/impairment.md.
#
#   scripts/impair.sh [run] [OPTIONS] -- EDGE_CMD...
#   scripts/impair.sh [run] [OPTIONS] -- CLOUD_CMD... -- EDGE_CMD...
#       set up, start CLOUD_CMD in the cloud namespace in the background, run EDGE_CMD in the
#       edge namespace, tear everything down (also on failure or Ctrl-C); exits with
#       EDGE_CMD's status. An empty cloud part (`-- -- EDGE_CMD`) lets EDGE_CMD contain `--`.
#   scripts/impair.sh up [OPTIONS] [--name NAME]   set up and leave running; prints NAME
#   scripts/impair.sh exec NAME edge|cloud -- CMD... run CMD in that namespace
#   scripts/impair.sh down NAME                      stop, print counters, tear down
#   scripts/impair.sh selftest [OPTIONS]             measure ping RTT, UDP loss, TCP rate
#   scripts/impair.sh check                          exit 0 if usable here, 3 if not
#
# OPTIONS (applied to each direction):
#   --rtt MS      round-trip time; each direction gets MS/2 one-way delay   [0]
#   --jitter MS   uniform +-MS per direction (may reorder packets)         [0]
#   --rate KBIT   token-bucket rate per direction, kbit/s, 0 = unlimited  [0]
#   --loss PCT    loss per packet per direction, percent                   [0]
#   --queue PKTS  drop-tail queue behind the rate limiter                  [100]
#   --seed N      RNG seed                                                 [1]
#   --wait-port P (run) wait until TCP port P listens in the cloud ns before EDGE_CMD
#   --fwd 'ARGS'  extra arguments for tools/impair (e.g. '--loss-pct-ab 2')
#   --keep-log F  (run, selftest) copy the forwarder's log to F
#
# Commands see IMPAIR_EDGE_IP, IMPAIR_CLOUD_IP, IMPAIR_EDGE_NS, IMPAIR_CLOUD_NS.
# Without root, /dev/net/tun or permission for namespaces it prints "skipped" and exits 0
# (`check` exits 3 instead, so a caller can tell).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE_BASE=/run/spotlight-impair
EDGE_IP=10.77.0.1
CLOUD_IP=10.77.0.2
TUN=sltun

rtt=0 jitter=0 rate=0 loss=0 queue=100 seed=1 wait_port="" fwd_extra="" keep_log="" name=""
cloud_cmd=() edge_cmd=()

say() { echo "impair: $*" >&2; }
die() { say "error: $*"; exit 1; }
skip() { echo "impair: skipped: $*"; exit "${SKIP_RC:-0}"; }

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# ---- availability ---------------------------------------------------------------------
preflight() {
    [ "$(id -u)" = 0 ] || skip "needs root for network namespaces and TUN devices"
    [ -c /dev/net/tun ] || skip "no /dev/net/tun on this machine"
    command -v ip >/dev/null || skip "no 'ip' command (Debian: iproute2)"
    local probe="sl-probe-$$"
    if ! ip netns add "$probe" 2>/dev/null; then
        skip "creating a network namespace is not permitted here"
    fi
    if ! ip -n "$probe" tuntap add dev "$TUN" mode tun 2>/dev/null; then
        ip netns del "$probe" 2>/dev/null
        skip "creating a TUN device is not permitted here"
    fi
    ip netns del "$probe"
}

impair_bin() {
    local bin=${IMPAIR_BIN:-$ROOT/tools/impair/target/release/impair}
    if [ ! -x "$bin" ] || [ "$ROOT/tools/impair/src/main.rs" -nt "$bin" ]; then
        [ -n "${IMPAIR_BIN:-}" ] && die "IMPAIR_BIN=$bin is not executable"
        command -v cargo >/dev/null || die "tools/impair is not built and there is no cargo"
        say "building tools/impair (release)"
        cargo build --quiet --release --manifest-path "$ROOT/tools/impair/Cargo.toml" >&2 \
            || die "cargo build of tools/impair failed"
    fi
    echo "$bin"
}

# ---- options ---------------------------------------------------------------------------
parse_opts() {
    while [ $# -gt 0 ]; do
        case $1 in
            --rtt) rtt=$2; shift 2 ;;
            --jitter) jitter=$2; shift 2 ;;
            --rate) rate=$2; shift 2 ;;
            --loss) loss=$2; shift 2 ;;
            --queue) queue=$2; shift 2 ;;
            --seed) seed=$2; shift 2 ;;
            --wait-port) wait_port=$2; shift 2 ;;
            --fwd) fwd_extra=$2; shift 2 ;;
            --keep-log) keep_log=$2; shift 2 ;;
            --name) name=$2; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            --) shift; split_cmds "$@"; return ;;
            *) die "unknown option $1 (see $0 --help)" ;;
        esac
    done
}

# `-- A... -- B...`: A is the cloud command, B the edge command; `-- B...`: edge only.
split_cmds() {
    local seen=0 a=()
    while [ $# -gt 0 ]; do
        if [ "$1" = "--" ] && [ $seen = 0 ]; then
            seen=1; shift; cloud_cmd=("${a[@]+"${a[@]}"}"); a=(); continue
        fi
        a+=("$1"); shift
    done
    edge_cmd=("${a[@]+"${a[@]}"}")
}

num() { [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1 must be a non-negative number, got '$2'"; }
check_opts() {
    num --rtt "$rtt"; num --jitter "$jitter"; num --rate "$rate"; num --loss "$loss"
    num --queue "$queue"; [[ $seed =~ ^[0-9]+$ ]] || die "--seed must be an integer"
}

# ---- set up / tear down ----------------------------------------------------------------
# Globals of one instance: E (edge ns), C (cloud ns), STATE (dir), FWD_PID.
E="" C="" STATE="" FWD_PID=""

setup() {
    local id=$1
    E="sl-edge-$id" C="sl-cloud-$id" STATE="$STATE_BASE/$id"
    mkdir -p "$STATE" || die "cannot create $STATE"
    echo "$E" > "$STATE/edge_ns"; echo "$C" > "$STATE/cloud_ns"
    ip netns add "$E" || die "ip netns add $E failed"
    ip netns add "$C" || die "ip netns add $C failed"
    local ns ip
    for ns in "$E" "$C"; do
        if [ "$ns" = "$E" ]; then ip=$EDGE_IP; else ip=$CLOUD_IP; fi
        ip -n "$ns" link set lo up
        ip -n "$ns" tuntap add dev "$TUN" mode tun || die "TUN in $ns failed"
        ip -n "$ns" addr add "$ip/24" dev "$TUN"
        ip -n "$ns" link set "$TUN" up
    done
    local bin; bin=$(impair_bin) || exit 1
    local one_way; one_way=$(awk -v r="$rtt" 'BEGIN{printf "%.3f", r/2}')
    # shellcheck disable=SC2086 # fwd_extra is a word list on purpose
    setsid "$bin" --tun-a "$TUN" --netns-a "/run/netns/$E" --tun-b "$TUN" --netns-b "/run/netns/$C" \
        --delay "$one_way" --jitter "$jitter" --rate "$rate" --loss-pct "$loss" \
        --queue "$queue" --seed "$seed" --stats-json "$STATE/stats.json" $fwd_extra \
        > "$STATE/forwarder.log" 2>&1 < /dev/null &
    FWD_PID=$!
    echo "$FWD_PID" > "$STATE/forwarder.pid"
    # Ready when the TUN devices have carrier (the forwarder attached to both).
    local i
    for i in $(seq 50); do
        if ! kill -0 "$FWD_PID" 2>/dev/null; then
            cat "$STATE/forwarder.log" >&2; die "forwarder exited at start"
        fi
        if ip -n "$E" link show "$TUN" | grep -q LOWER_UP && ip -n "$C" link show "$TUN" | grep -q LOWER_UP; then
            break
        fi
        sleep 0.1
    done
    say "up: edge ns $E ($EDGE_IP) <-> cloud ns $C ($CLOUD_IP): rtt $rtt ms, jitter ±$jitter ms/dir, rate $rate kbit/s/dir, loss $loss %/dir, queue $queue, seed $seed"
}

# Kills what runs in a namespace (only processes inside our own namespaces).
kill_ns_pids() {
    local ns=$1 pids
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    [ -n "$pids" ] || return 0
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null
    local i
    for i in $(seq 20); do
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [ -n "$pids" ] || return 0
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null
}

teardown() {
    [ -n "$STATE" ] || return 0
    local pid=${FWD_PID:-$(cat "$STATE/forwarder.pid" 2>/dev/null)}
    for ns in "$C" "$E"; do [ -n "$ns" ] && kill_ns_pids "$ns"; done
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        local i
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    fi
    grep '^impair: [ab]->' "$STATE/forwarder.log" 2>/dev/null | grep -v ' delay ' >&2
    [ -n "$keep_log" ] && cp "$STATE/forwarder.log" "$keep_log" 2>/dev/null
    [ -n "$E" ] && ip netns del "$E" 2>/dev/null
    [ -n "$C" ] && ip netns del "$C" 2>/dev/null
    rm -rf "$STATE"
    STATE=""
}

in_ns() { # in_ns NS CMD...: run with the IMPAIR_* environment
    local ns=$1; shift
    ip netns exec "$ns" env IMPAIR_EDGE_IP=$EDGE_IP IMPAIR_CLOUD_IP=$CLOUD_IP \
        IMPAIR_EDGE_NS="$E" IMPAIR_CLOUD_NS="$C" "$@"
}

wait_listen() { # wait_listen NS PORT SECONDS
    local i
    for i in $(seq $(( $3 * 10 ))); do
        ip netns exec "$1" ss -Hltn "sport = :$2" 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

# ---- subcommands -----------------------------------------------------------------------
cmd_run() {
    parse_opts "$@"; check_opts
    [ ${#edge_cmd[@]} -gt 0 ] || die "no edge command (usage: $0 [OPTIONS] -- [CLOUD_CMD -- ] EDGE_CMD)"
    preflight
    trap 'teardown' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    setup "$$"
    if [ ${#cloud_cmd[@]} -gt 0 ]; then
        in_ns "$C" "${cloud_cmd[@]}" &
        say "cloud command started in $C: ${cloud_cmd[*]}"
    fi
    if [ -n "$wait_port" ]; then
        wait_listen "$C" "$wait_port" 120 || die "nothing listens on $CLOUD_IP:$wait_port after 120 s"
    fi
    # In the background with `wait`, so a TERM to this script is handled at once (bash
    # runs traps only between commands); stdin stays the terminal's.
    in_ns "$E" "${edge_cmd[@]}" <&0 &
    wait $!
    local rc=$?
    say "edge command exited with $rc"
    exit $rc
}

cmd_up() {
    parse_opts "$@"; check_opts
    preflight
    [ -n "$name" ] || name="$$"
    [[ $name =~ ^[A-Za-z0-9_]{1,20}$ ]] || die "--name: 1..20 letters, digits or _"
    [ -e "$STATE_BASE/$name" ] && die "$name is already up (scripts/impair.sh down $name)"
    trap 'teardown' EXIT
    setup "$name"
    trap - EXIT
    echo "$name"
}

load() {
    [ $# -ge 1 ] || die "which instance? (the NAME that 'up' printed)"
    STATE="$STATE_BASE/$1"
    [ -d "$STATE" ] || die "no instance $1 (ls $STATE_BASE)"
    E=$(cat "$STATE/edge_ns") C=$(cat "$STATE/cloud_ns")
}

cmd_exec() {
    load "$1"; local side=${2:-}; shift 2 || die "usage: exec NAME edge|cloud -- CMD..."
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || die "no command"
    case $side in
        edge) in_ns "$E" "$@" ;;
        cloud) in_ns "$C" "$@" ;;
        *) die "side must be edge or cloud" ;;
    esac
}

cmd_down() { load "${1:-}"; teardown; }

cmd_check() { SKIP_RC=3 preflight; echo "impair: available"; }

pyjson() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print($2)" "$1"; }

cmd_selftest() {
    parse_opts "$@"; check_opts
    preflight
    command -v ping >/dev/null || skip "no ping (Debian: iputils-ping)"
    trap 'teardown' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    setup "st$$"
    local probe="$ROOT/scripts/impair_probe.py" tmp="$STATE/probe" fail=0
    mkdir -p "$tmp"

    # 1. ping: RTT and round-trip loss (a ping is lost if either direction drops it).
    local n_ping=200 out
    out=$(in_ns "$E" ping -q -n -c $n_ping -i 0.02 -W 2 "$CLOUD_IP" 2>&1)
    local p_loss p_avg p_mdev
    p_loss=$(echo "$out" | sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p')
    p_avg=$(echo "$out" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/[0-9.]*/\([0-9.]*\) ms.*|\1|p')
    p_mdev=$(echo "$out" | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/[0-9.]*/\([0-9.]*\) ms.*|\2|p')

    # 2. UDP: 2000 datagrams edge -> cloud, paced 0.5 ms apart.
    local n_udp=2000 udp_port=47001
    in_ns "$C" timeout 90 python3 "$probe" udp-recv --port $udp_port --ready "$tmp/udp.ready" > "$tmp/udp.json" &
    local rpid=$! i
    for i in $(seq 100); do [ -e "$tmp/udp.ready" ] && break; sleep 0.05; done
    in_ns "$E" timeout 60 python3 "$probe" udp-send --host "$CLOUD_IP" --port $udp_port --count $n_udp --interval-ms 0.5 >/dev/null
    wait $rpid
    local udp; udp=$(cat "$tmp/udp.json")

    # 3. TCP: cloud sends as fast as it can for 6 s; edge measures goodput.
    local tcp_port=47002 secs=6
    in_ns "$C" timeout 60 python3 "$probe" tcp-serve --port $tcp_port --ready "$tmp/tcp.ready" --timeout 30 >/dev/null &
    local spid=$!
    for i in $(seq 100); do [ -e "$tmp/tcp.ready" ] && break; sleep 0.05; done
    local tcp; tcp=$(in_ns "$E" timeout 60 python3 "$probe" tcp-recv --host "$CLOUD_IP" --port $tcp_port --seconds $secs)
    wait $spid

    # Forwarder counters: stop it now so its JSON is written.
    kill -TERM "$FWD_PID"; for i in $(seq 50); do kill -0 "$FWD_PID" 2>/dev/null || break; sleep 0.1; done
    local stats; stats=$(cat "$STATE/stats.json" 2>/dev/null || echo '{}')

    echo
    echo "impair selftest: rtt $rtt ms, loss $loss %/direction, rate $rate kbit/s, jitter ±$jitter ms, seed $seed"
    printf '%-34s %-22s %s\n' "what" "configured" "measured"
    local exp_ping_loss; exp_ping_loss=$(awk -v l="$loss" 'BEGIN{printf "%.2f", 100*(1-(1-l/100)^2)}')
    printf '%-34s %-22s %s\n' "ping RTT avg (mdev), $n_ping pings" "$rtt ms" "$p_avg ms ($p_mdev)"
    printf '%-34s %-22s %s\n' "ping loss (both directions)" "$exp_ping_loss %" "$p_loss %"
    local u_recv u_ooo
    u_recv=$(pyjson "$udp" 'd["unique"]'); u_ooo=$(pyjson "$udp" 'd["out_of_order"]')
    local exp_udp; exp_udp=$(awk -v l="$loss" -v n=$n_udp 'BEGIN{printf "%.0f", n*(1-l/100)}')
    printf '%-34s %-22s %s\n' "UDP received of $n_udp (edge->cloud)" "$exp_udp" "$u_recv ($(awk -v r="$u_recv" -v n=$n_udp 'BEGIN{printf "%.2f", 100*(1-r/n)}') % lost, $u_ooo out of order)"
    local t_mbit; t_mbit=$(pyjson "$tcp" 'd.get("mbit_s", 0)')
    local rate_txt="unlimited"; [ "$rate" != 0 ] && rate_txt="$(awk -v r="$rate" 'BEGIN{printf "%.3f", r/1000}') Mbit/s"
    printf '%-34s %-22s %s\n' "TCP goodput cloud->edge, ${secs} s" "$rate_txt" "$t_mbit Mbit/s ($(pyjson "$tcp" 'd.get("bytes",0)') B)"
    local fwd_line
    fwd_line=$(pyjson "$stats" '" ".join("%s: %d rx, %d fwd, %d lost (%.2f %%), %d queue-dropped;" % (k, v["received"], v["forwarded"], v["dropped_loss"], 100.0*v["dropped_loss"]/max(1,v["received"]), v["dropped_queue"]) for k, v in d.items() if k != "seed")' 2>/dev/null)
    printf '%-34s %-22s %s\n' "TCP congestion control (edge ns)" "" "$(ip netns exec "$E" sysctl -n net.ipv4.tcp_congestion_control)"
    printf '%-34s %-22s %s\n' "forwarder counters" "loss $loss %/dir" "$fwd_line"

    # Checks: RTT within [rtt - 0.5, rtt + 2*jitter + 5] ms; UDP loss within 4 sigma of
    # binomial (plus 2 packets); TCP no faster than the rate limit (+5 %).
    local ok
    ok=$(awk -v m="$p_avg" -v r="$rtt" -v j="$jitter" 'BEGIN{print (m != "" && m >= r-0.5 && m <= r+2*j+5) ? 1 : 0}')
    [ "$ok" = 1 ] || { echo "FAIL: ping RTT $p_avg ms vs $rtt ms"; fail=1; }
    ok=$(awk -v got="$u_recv" -v n=$n_udp -v l="$loss" 'BEGIN{p=l/100; e=n*p; s=sqrt(n*p*(1-p)); d=n-got-e; if(d<0)d=-d; print (d <= 4*s+2) ? 1 : 0}')
    [ "$ok" = 1 ] || { echo "FAIL: UDP received $u_recv of $n_udp with loss $loss %"; fail=1; }
    if [ "$jitter" = 0 ] && [ "$u_ooo" != 0 ]; then echo "FAIL: $u_ooo UDP datagrams out of order without jitter"; fail=1; fi
    if [ "$rate" != 0 ]; then
        ok=$(awk -v m="$t_mbit" -v r="$rate" 'BEGIN{print (m <= r/1000*1.05) ? 1 : 0}')
        [ "$ok" = 1 ] || { echo "FAIL: TCP $t_mbit Mbit/s above the $rate kbit/s limit"; fail=1; }
    fi
    [ "$(pyjson "$tcp" 'd.get("bytes",0)')" -gt 0 ] || { echo "FAIL: no TCP data"; fail=1; }
    if [ $fail = 0 ]; then echo "selftest: ok"; else echo "selftest: FAILED"; fi
    return $fail
}

sub=${1:-}
case $sub in
    run) shift; cmd_run "$@" ;;
    up) shift; cmd_up "$@" ;;
    exec) shift; cmd_exec "$@" ;;
    down) shift; cmd_down "$@" ;;
    selftest) shift; cmd_selftest "$@"; exit $? ;;
    check) cmd_check ;;
    -h|--help|help|"") usage ;;
    *) cmd_run "$@" ;;
esac
