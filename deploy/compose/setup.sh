#!/bin/sh
# One-shot set-up of the three-hospital demo: the coordinator's PKI, each hospital's keys,
# data and hospital.toml. In a real federation each hospital runs `fedtune pki hospital`
# on its own machine and sends only the two .pub files to the coordinator.
set -eu
COORD=${COORD:-/coordinator}
HOSPITALS=${HOSPITALS:-/hospitals}
WORK=${WORK:-/tmp}
if [ -f "$COORD/pki/ca.pem" ]; then echo "already set up"; exit 0; fi
fedtune pki ca --out "$COORD/pki"
fedtune pki server --ca "$COORD/pki" --out "$COORD/pki" --address coordinator
fedtune data --out "$WORK/data" --hospitals 3
for h in st-elsewhere northgate-general riverside-community; do
  home="$HOSPITALS/$h"
  fedtune pki hospital --name "$h" --out "$home/keys"
  cp "$COORD/pki/ca.pem" "$COORD/pki/coordinator.pub" "$home/keys/"
  mkdir -p "$home/data" && cp "$WORK/data/$h".*.jsonl "$home/data/"
  fedtune client example-config \
    | sed -e "s/st-elsewhere/$h/g" \
          -e 's/coordinator.example.org:9092/coordinator:9092/' \
          -e "s#data/train.jsonl#data/$h.train.jsonl#" -e "s#data/eval.jsonl#data/$h.eval.jsonl#" \
          -e 's#path = "models/SmolLM2-135M-Instruct"#path = "smollm2"#' \
          -e 's/require_dp = true/require_dp = false/' \
    > "$home/hospital.toml"
done
echo "set up: the coordinator's PKI and three hospitals"
