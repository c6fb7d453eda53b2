#!/bin/sh
# Admit the demo hospitals whose public keys are in /incoming (idempotent). Runs in the
# coordinator's network namespace: `add-hospital` uses the loopback-only Control API.
set -eu
HOME_DIR=${HOME_DIR:-/var/lib/fedtune}
INCOMING=${INCOMING:-/incoming}
for h in st-elsewhere northgate-general riverside-community; do
  if grep -q "\"$h\"" "$HOME_DIR/hospitals/registry.json" 2>/dev/null; then continue; fi
  fedtune server add-hospital --home "$HOME_DIR" --name "$h" \
    --node-key "$INCOMING/$h.node.pub" --envelope-key "$INCOMING/$h.pub"
done
