# Shell helpers of the fleet benchmarks (bench-fleet, bench-restart,
# bench-migrations), sourced by each. The callers set B (the directory of
# the binaries) and admin (HOST:PORT of the operator API); `manage` and
# what calls it read dir, the run's directory, whose certs/ holds the
# operator API's token.

# The managers these scripts start serve their operator API in plain HTTP
# on loopback, where the scripts reach it with curl: an admin_tls from the
# caller's environment would leave them without answers.
unset FLEET_ADMIN_TLS

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit } print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f\n", b - a }'; }

ports_free() { # ports_free PORT...: exits unless no one listens on any
    local p
    for p in "$@"; do
        if ss -Hltn "sport = :$p" | grep -q .; then
            echo "port $p is in use; set PORT_BASE" >&2
            exit 1
        fi
    done
}

stop() { # stop PID: SIGTERM, then SIGKILL after 10 s
    local pid="$1" i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# with_token CMD [ARG...]: CMD told where this run's manager keeps the
# operator API's token (in its certs_dir), if it made one: builds from
# before the token make none, and some refuse the variable.
with_token() {
    if [ -f "$dir/certs/admin.token" ]; then
        FLEET_ADMIN_TOKEN_FILE="$dir/certs/admin.token" "$@"
    else
        "$@"
    fi
}
# manage COMMAND [ARG...]: an operator command on this run's manager.
manage() { with_token "$B/fleet-manager" "$1" --admin "$admin" "${@:2}"; }
summary() { manage summary 2>/dev/null || true; }
answers() { # answers JQ_EXPR: the summary came, and the expression holds for it
    local s # (jq -e takes no input as true: an empty answer is no answer)
    s="$(summary)"
    [ -n "$s" ] && jq -e "$1" <<<"$s" >/dev/null 2>&1
}
