#!/usr/bin/env bash
# Starts one real server in the foreground, in a private data directory, listening on loopback:
#
#   tests/servers.sh kafka DIR PORT                       a Kafka-compatible broker (tansu, sqlite engine)
#   tests/servers.sh kafka-memory DIR PORT                the same on tansu's memory engine (benchmarks)
#   tests/servers.sh clickhouse DIR HTTP_PORT TCP_PORT INTERSERVER_PORT
#   tests/servers.sh free-port                            prints a free TCP port on loopback
#
# The process replaces this script (exec), so killing the child stops the server. tests/run.sh
# uses it for the servers the whole suite shares; tests/servers/*.rs for the private servers of
# the fault tests, which stop and restart theirs.
set -euo pipefail

kind="$1"
if [ "$kind" = free-port ]; then
    while :; do
        p=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; exit 0; }
    done
fi
dir="$2"
mkdir -p "$dir"
cd "$dir"

case "$kind" in
kafka | kafka-memory)
    port="$3"
    tansu="${TANSU_BIN:-$(command -v tansu || true)}"
    [ -x "$tansu" ] || { echo "tansu not found: run tests/run.sh, which installs it" >&2; exit 1; }
    # The sqlite path is resolved from the working directory: start from the data directory.
    engine="sqlite://tansu.db"
    [ "$kind" = kafka ] || engine="memory://tansu/"
    exec "$tansu" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "$engine" >>"$dir/broker.log" 2>&1
    ;;
clickhouse)
    http="$3" tcp="$4" inter="$5"
    server=""
    for p in /usr/bin/clickhouse-server /usr/sbin/clickhouse-server /usr/bin/clickhouse; do
        [ -x "$p" ] && { server="$p"; break; }
    done
    [ -n "$server" ] || { echo "clickhouse-server is not installed: run tests/run.sh" >&2; exit 1; }
    cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>$dir/server.log</log><errorlog>$dir/error.log</errorlog><console>0</console></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$http</http_port>
    <tcp_port>$tcp</tcp_port>
    <interserver_http_port>$inter</interserver_http_port>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
</yandex>
EOF
    cat >"$dir/users.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
EOF
    exec "$server" --config-file="$dir/config.xml" >/dev/null 2>&1
    ;;
*)
    echo "usage: $0 kafka DIR PORT | clickhouse DIR HTTP TCP INTERSERVER" >&2
    exit 2
    ;;
esac
