#!/bin/sh
# Admit the three demo hospitals once the coordinator answers (idempotent).
set -eu
for h in st-elsewhere northgate-general riverside-community; do
  if grep -q "\"$h\"" /var/lib/fedtune/hospitals/registry.json 2>/dev/null; then continue; fi
  fedtune server add-hospital --home /var/lib/fedtune --name "$h" \
    --node-key "/hospitals/$h/keys/$h.node.pub" --envelope-key "/hospitals/$h/keys/$h.pub"
done
