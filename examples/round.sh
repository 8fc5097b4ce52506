#!/usr/bin/env bash
# Three FedSRD rounds among 3 clients, one directory per party, files carried by `cp`
# exactly as they would be carried between sites with no network (USB stick, sneakernet).
#
#   bash examples/round.sh [WORKDIR]        (default: ./round-demo, replaced if it exists)
#
# Local training is simulated by examples/perturb_local.py (seeded noise on the global
# factors, documented there), so this runs in seconds with no model weights or data.
# Layout:
#   WORKDIR/base/                      the base model's config.json (all init needs)
#   WORKDIR/coordinator/{inbox,outbox,state}
#   WORKDIR/client-N/{state,outbox,inbox}
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="${1:-round-demo}"
rounds=3
clients=(alpha beta gamma)

rm -rf "$work"
mkdir -p "$work/base" "$work/coordinator"/{inbox,outbox,state}
for c in "${clients[@]}"; do mkdir -p "$work/client-$c"/{state,outbox,inbox}; done

# A small Llama-shaped config (no weights needed: init reads the config only).
cat > "$work/base/config.json" <<'JSON'
{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
 "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
 "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 512}
JSON

co="$work/coordinator"
fedsrd init --base "$work/base" --rank 8 --alpha 16 --targets all-linear --seed 0 \
  --out "$co/state/global-r0.safetensors"
# Every client receives the initial state once.
for c in "${clients[@]}"; do cp "$co/state/global-r0.safetensors" "$work/client-$c/state/"; done

for ((t = 1; t <= rounds; t++)); do
  prev=$((t - 1))
  echo "=== round $t"
  for i in "${!clients[@]}"; do
    c="${clients[$i]}"
    cd_="$work/client-$c"
    python "$here/perturb_local.py" "$cd_/state/global-r$prev.safetensors" \
      "$cd_/state/local-r$t.safetensors" --seed $((100 * t + i)) --samples $((50 + 10 * i))
    fedsrd sparsify --global "$cd_/state/global-r$prev.safetensors" \
      --local "$cd_/state/local-r$t.safetensors" --client "$c" \
      --out "$cd_/outbox/upload-r$t-$c.safetensors"
    cp "$cd_/outbox/upload-r$t-$c.safetensors" "$co/inbox/"          # carried to the coordinator
  done
  fedsrd aggregate --global "$co/state/global-r$prev.safetensors" \
    --out "$co/state/aggregate-r$t.safetensors" "$co/inbox/"upload-r$t-*.safetensors
  fedsrd broadcast --global "$co/state/global-r$prev.safetensors" \
    --aggregate "$co/state/aggregate-r$t.safetensors" \
    --out "$co/outbox/broadcast-r$t.safetensors" --out-global "$co/state/global-r$t.safetensors"
  for c in "${clients[@]}"; do
    cp "$co/outbox/broadcast-r$t.safetensors" "$work/client-$c/inbox/"  # carried back
    fedsrd apply --global "$work/client-$c/state/global-r$prev.safetensors" \
      --broadcast "$work/client-$c/inbox/broadcast-r$t.safetensors" \
      --out "$work/client-$c/state/global-r$t.safetensors"
    cmp -s "$work/client-$c/state/global-r$t.safetensors" "$co/state/global-r$t.safetensors" \
      || { echo "client $c diverged from the coordinator" >&2; exit 1; }
  done
  echo "round $t: every client holds the coordinator's global-r$t.safetensors, bit for bit"
done

echo "=== what travelled in round $rounds"
fedsrd inspect "$co/inbox/upload-r$rounds-alpha.safetensors"
fedsrd inspect "$co/outbox/broadcast-r$rounds.safetensors"
