#!/bin/sh
# One-shot set-up of the three-hospital demo: the coordinator's PKI, each hospital's keys,
# data and hospital.toml, and the hospitals' public keys for admission. In a real
# federation each hospital runs `fedtune pki hospital` on its own machine and sends only
# the two .pub files to the coordinator; the CA key is kept offline.
#   COORD      the coordinator's home (its volume)      default /coordinator
#   HOSPITALS  one folder per hospital (their volumes)  default /hospitals
#   INCOMING   the hospitals' .pub files for admission  default /incoming
#   WORK       scratch: the CA and the demo data        default /tmp (gone after set-up)
#   COORDINATOR_OWNER, HOSPITAL_OWNER  uid:gid to hand the volumes to (when set)
set -eu
COORD=${COORD:-/coordinator}
HOSPITALS=${HOSPITALS:-/hospitals}
INCOMING=${INCOMING:-/incoming}
WORK=${WORK:-/tmp}
NAMES="st-elsewhere northgate-general riverside-community"
if [ -f "$COORD/pki/ca.pem" ]; then echo "already set up"; exit 0; fi
umask 077
# the CA signs the coordinator's TLS certificate, then its key is left behind in $WORK:
# only ca.pem, server.pem/server.key and coordinator.key/.pub go to the coordinator
fedtune pki ca --out "$WORK/ca"
mkdir -p "$COORD/pki" "$INCOMING"
cp "$WORK/ca/ca.pem" "$COORD/pki/"
fedtune pki server --ca "$WORK/ca" --out "$COORD/pki" --address coordinator
rm -f "$WORK/ca/ca.key"
fedtune data --out "$WORK/data" --hospitals 3
for h in $NAMES; do
  home="$HOSPITALS/$h"
  fedtune pki hospital --name "$h" --out "$home/keys"
  cp "$COORD/pki/ca.pem" "$COORD/pki/coordinator.pub" "$home/keys/"
  cp "$home/keys/$h.node.pub" "$home/keys/$h.pub" "$INCOMING/"
  mkdir -p "$home/data" && cp "$WORK/data/$h".*.jsonl "$home/data/"
  fedtune client example-config \
    | sed -e "s/st-elsewhere/$h/g" \
          -e 's/coordinator.example.org:9092/coordinator:9092/' \
          -e "s#data/train.jsonl#data/$h.train.jsonl#" -e "s#data/eval.jsonl#data/$h.eval.jsonl#" \
          -e 's#path = "models/SmolLM2-135M-Instruct"#path = "smollm2"#' \
          -e 's/require_dp = true/require_dp = false/' \
    > "$home/hospital.toml"
done
chmod 755 "$INCOMING" && chmod 644 "$INCOMING"/*.pub  # public keys, read by the coordinator's user
if [ -n "${COORDINATOR_OWNER:-}" ]; then chown -R "$COORDINATOR_OWNER" "$COORD"; fi
if [ -n "${HOSPITAL_OWNER:-}" ]; then
  for h in $NAMES; do chown -R "$HOSPITAL_OWNER" "$HOSPITALS/$h"; done
fi
echo "set up: the coordinator's PKI and three hospitals"
