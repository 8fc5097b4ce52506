#!/usr/bin/env bash
# One FedSRD round with signed files: a coordinator and three clients (alice, bob, carol).
#
#   examples/signed_round.sh [WORK_DIR]
#
# Everything happens under WORK_DIR (default: a new temporary directory); nothing is
# downloaded. The base model is a tiny Llama config written here (fedsrd init reads only
# config.json). Local training is simulated by a few lines of Python that nudge the global
# factors; with a real model, train with your own script or `fedsrd train-local`.
set -euo pipefail

WORK=${1:-$(mktemp -d -t fedsrd-signed-XXXXXX)}
mkdir -p "$WORK"
cd "$WORK"
CLIENTS=(alice bob carol)
echo "working in $WORK"

# --- 0. A base model (config only) --------------------------------------------------------
mkdir -p base
cat > base/config.json <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
JSON

# --- 1. Keys: every party makes its own pair and hands out NAME.pub -----------------------
mkdir -p keys trust-coordinator trust-client inbox
for party in coordinator "${CLIENTS[@]}"; do
  fedsrd keygen --out "keys/$party" > /dev/null
done
# The coordinator trusts the clients' keys (and its own); each client trusts the coordinator.
cp keys/coordinator.pub keys/alice.pub keys/bob.pub keys/carol.pub trust-coordinator/
cp keys/coordinator.pub trust-client/

# --- 2. Coordinator: round-0 global state, signed ------------------------------------------
fedsrd init --base base --out global-r0.safetensors --rank 4 --alpha 8 --sign-key keys/coordinator.key

# --- 3. Clients: train (simulated), sparsify, sign ------------------------------------------
simulate_training() {  # GLOBAL OUT SEED
  python - "$@" <<'PY'
import sys
from dataclasses import replace
import torch
from fedsrd_cli.files.artifacts import read_artifact, write_artifact
g, out, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
state = read_artifact(g, kind="state")
gen = torch.Generator().manual_seed(seed)
tensors = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in state.iter_tensors()}
header = replace(state.header, parent_hash=state.header.content_hash, num_samples=100 + seed, info={})
write_artifact(out, header, tensors)
PY
}
seed=1
for client in "${CLIENTS[@]}"; do
  simulate_training global-r0.safetensors "local-$client.safetensors" "$seed"
  fedsrd sparsify --global global-r0.safetensors --local "local-$client.safetensors" \
    --client "$client" --out "inbox/$client-r1.safetensors" \
    --trust trust-client --sign-key "keys/$client.key" > /dev/null
  seed=$((seed + 1))
done

# --- 4. A bad file arrives: a copy of carol's upload with one byte flipped ------------------
python - <<'PY'
data = bytearray(open("inbox/carol-r1.safetensors", "rb").read())
data[-3] ^= 0x01
open("inbox/copy-of-carol-r1.safetensors", "wb").write(data)
PY
set +e
fedsrd status inbox --global global-r0.safetensors --clients alice,bob,carol --trust trust-coordinator
code=$?
set -e
echo "status exit code: $code (11: invalid files present)"
[ "$code" -eq 11 ]
mkdir -p rejected && mv inbox/copy-of-carol-r1.safetensors rejected/

# --- 5. Coordinator: the round is ready; aggregate and broadcast, signed ---------------------
fedsrd status inbox --global global-r0.safetensors --clients alice,bob,carol --trust trust-coordinator
fedsrd aggregate --global global-r0.safetensors --out aggregate-r1.safetensors inbox/*-r1.safetensors \
  --trust trust-coordinator --sign-key keys/coordinator.key --max-update-norm 100
fedsrd broadcast --global global-r0.safetensors --aggregate aggregate-r1.safetensors \
  --out broadcast-r1.safetensors --out-global global-r1.safetensors \
  --trust trust-coordinator --sign-key keys/coordinator.key

# --- 6. Clients: apply the coordinator's broadcast (refused unless signed by `coordinator`) ---
expected=$(fedsrd inspect global-r1.safetensors --json | python -c "import json,sys; print(json.load(sys.stdin)['content_hash'])")
for client in "${CLIENTS[@]}"; do
  fedsrd apply --global global-r0.safetensors --broadcast broadcast-r1.safetensors \
    --out "$client-global-r1.safetensors" --trust trust-client > /dev/null
  got=$(fedsrd inspect "$client-global-r1.safetensors" --json | python -c "import json,sys; print(json.load(sys.stdin)['content_hash'])")
  [ "$got" = "$expected" ] || { echo "$client holds $got, coordinator $expected"; exit 1; }
done
echo "round 1 complete: every client holds the coordinator's state $expected"
