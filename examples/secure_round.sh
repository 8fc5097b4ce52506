#!/usr/bin/env bash
# A signed secure round among three sites, offline: the coordinator learns only the sum of the
# sites' updates (docs/security.md, "Secure aggregation"). One site drops out after the roster
# is signed; the coordinator signs a new roster without it and the other two mask again.
#
#   bash examples/secure_round.sh [WORK_DIR]
#
# Every party has its own folder (coordinator/, site-a/, site-b/, site-c/); files move only by
# copying, as they would on a USB stick. The base model is the demo's toy Llama
# (`fedsrd demo-assets --model toy`, pretrained once and cached; about a minute and a half the
# first time); BASE and DATA (one JSON-lines file) take another model and data instead.
# At the end every site holds the coordinator's global state byte for byte.
#
# The round runs at FedSRD's traffic: the roster sends 30% of each projection, at positions public
# to all (drawn from the state's hash), in 16-bit words; each site keeps what it did not send in a
# residual file of its own that never travels (sent in its next round), and the coordinator takes a
# step of 4, as measured for these settings (docs/results.md, "A secure round's step").
# DENSITY=1 WORD_BITS=32 STEP=1 give the dense, exact round instead.
set -euo pipefail

WORK=${1:-$(mktemp -d -t fedsrd-secure-XXXXXX)}
FEDSRD=${FEDSRD:-fedsrd}
mkdir -p "$WORK"
cd "$WORK"
SITES=(site-a site-b site-c)
DENSITY=${DENSITY:-0.3}
WORD_BITS=${WORD_BITS:-16}
STEP=${STEP:-4}
echo "working in $WORK"
mkdir -p coordinator/{keys,trust,inbox} "${SITES[@]/%//keys}" "${SITES[@]/%//trust}"

# --- 0. The base model and each site's data ----------------------------------------------------
if [ -z "${BASE:-}" ]; then
  $FEDSRD demo-assets --model toy --out assets > /dev/null
  BASE="$PWD/assets/base"
  DATA_FILES=(assets/clients/arithmetic/train.jsonl assets/clients/strings/train.jsonl assets/clients/code/train.jsonl)
else
  DATA_FILES=("$DATA" "$DATA" "$DATA")
fi

# --- 1. Keys: an Ed25519 identity and an X25519 agreement key per site, published --------------
$FEDSRD keygen --out coordinator/keys/coordinator > /dev/null
for site in "${SITES[@]}"; do
  $FEDSRD keygen --out "$site/keys/$site" > /dev/null
  $FEDSRD agreement-key --sign-key "$site/keys/$site.key" > /dev/null
done
# Everyone trusts everyone's identity; the sites also hold each other's agreement keys.
for party in coordinator "${SITES[@]}"; do
  for site in "${SITES[@]}"; do
    cp "$site/keys/$site.pub" "$site/keys/$site.agreement" "$party/trust/"
  done
  cp coordinator/keys/coordinator.pub "$party/trust/"
done

# --- 2. Coordinator: the round-0 state and the roster of round 1, signed ------------------------
$FEDSRD init --base "$BASE" --rank 4 --alpha 8 --sign-key coordinator/keys/coordinator.key \
  --out coordinator/global-r0.safetensors > /dev/null
$FEDSRD roster --global coordinator/global-r0.safetensors --sites site-a,site-b,site-c \
  --secure-density "$DENSITY" --word-bits "$WORD_BITS" \
  --sign-key coordinator/keys/coordinator.key --out coordinator/roster-r1-1.json > /dev/null
for site in "${SITES[@]}"; do cp coordinator/global-r0.safetensors coordinator/roster-r1-1.json "$site/"; done

# --- 3. Sites: train, then mask for the roster; site-c trains but never delivers ---------------
i=0
for site in "${SITES[@]}"; do
  $FEDSRD train-local --base "$BASE" --global "$site/global-r0.safetensors" --data "${DATA_FILES[$i]}" \
    --client "$site" --steps 4 --batch-size 4 --max-length 128 --lr 1e-3 \
    --trust "$site/trust" --sign-key "$site/keys/$site.key" --quiet --out "$site/local-r1.safetensors"
  i=$((i + 1))
done
mask() {  # SITE ROSTER -> the site's masked upload in the coordinator's inbox; its residual stays home
  $FEDSRD sparsify --secure --global "$1/global-r0.safetensors" --local "$1/local-r1.safetensors" \
    --client "$1" --roster "$1/$2" --agreement-key "$1/keys/$1.agreement.key" --trust "$1/trust" \
    --residual-out "$1/residual-${2%.json}.safetensors" \
    --sign-key "$1/keys/$1.key" --out "coordinator/inbox/$1-${2%.json}.safetensors" > /dev/null
}
mask site-a roster-r1-1.json
mask site-b roster-r1-1.json

# --- 4. Coordinator: site-c is missing, so the masks cannot cancel; a new roster without it -----
set +e
$FEDSRD aggregate --secure --roster coordinator/roster-r1-1.json --global coordinator/global-r0.safetensors \
  --trust coordinator/trust --out coordinator/aggregate-r1.safetensors coordinator/inbox/*-roster-r1-1.safetensors
code=$?
set -e
echo "aggregate of the first roster: exit $code (4: a site did not deliver)"
[ "$code" -eq 4 ] && [ ! -e coordinator/aggregate-r1.safetensors ]
$FEDSRD roster --global coordinator/global-r0.safetensors --sites site-a,site-b --attempt 2 \
  --secure-density "$DENSITY" --word-bits "$WORD_BITS" \
  --sign-key coordinator/keys/coordinator.key --out coordinator/roster-r1-2.json > /dev/null
for site in site-a site-b; do cp coordinator/roster-r1-2.json "$site/"; mask "$site" roster-r1-2.json; done

# --- 5. Coordinator: sum the masked uploads of the second roster, broadcast ---------------------
$FEDSRD aggregate --secure --roster coordinator/roster-r1-2.json --global coordinator/global-r0.safetensors \
  --trust coordinator/trust --sign-key coordinator/keys/coordinator.key \
  --out coordinator/aggregate-r1.safetensors coordinator/inbox/*-roster-r1-2.safetensors
echo "site-a's masked upload: $(wc -c < coordinator/inbox/site-a-roster-r1-2.safetensors) bytes" \
  "(density $DENSITY, $WORD_BITS-bit words; its residual, kept at home: site-a/residual-roster-r1-2.safetensors)"
$FEDSRD broadcast --global coordinator/global-r0.safetensors --aggregate coordinator/aggregate-r1.safetensors \
  --server-lr "$STEP" --trust coordinator/trust --sign-key coordinator/keys/coordinator.key \
  --out coordinator/broadcast-r1.safetensors --out-global coordinator/global-r1.safetensors > /dev/null

# --- 6. Every site, site-c included, applies the broadcast: the coordinator's state, bit for bit -
# The coordinator's copy carries its signature; without it, the bytes are the same.
unsigned_sha256() {
  python - "$1" <<'PY'
import hashlib, sys
from fedsrd_cli.trust.signing import read_signature
found = read_signature(sys.argv[1])
print(found.unsigned_digest.hex() if found else hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())
PY
}
expected=$(unsigned_sha256 coordinator/global-r1.safetensors)
for site in "${SITES[@]}"; do
  cp coordinator/broadcast-r1.safetensors "$site/"
  $FEDSRD apply --global "$site/global-r0.safetensors" --broadcast "$site/broadcast-r1.safetensors" \
    --trust "$site/trust" --out "$site/global-r1.safetensors" > /dev/null
  [ "$(unsigned_sha256 "$site/global-r1.safetensors")" = "$expected" ] \
    || { echo "$site's state differs from the coordinator's"; exit 1; }
done
echo "secure round 1 complete: site-a, site-b and site-c hold the coordinator's global-r1 byte for byte"
echo "(the coordinator's copy adds only its signature)"
