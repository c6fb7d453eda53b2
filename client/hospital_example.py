"""The example ``hospital.toml`` (``fedtune client example-config``) and the startup kit's
copy of it for one hospital (``fedtune server invite``): one text, tested to load."""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedtune.errors import FedTuneError

EXAMPLE = """\
# fedtune hospital daemon: `fedtune client start --config hospital.toml`
[hospital]
name = "st-elsewhere"                  # as registered with the coordinator

[coordinator]
address = "coordinator.example.org:9092"
ca = "keys/ca.pem"                     # the federation CA (or your own), verifies the coordinator
envelope_key = "keys/coordinator.pub"  # the coordinator's fedtune public key

[keys]
node_key = "keys/st-elsewhere.node.key"   # SuperNode authentication (0600)
envelope_key = "keys/st-elsewhere.key"    # signs and seals this hospital's updates (0600)

[data]
train = ["data/train.jsonl"]           # JSONL / CSV / Parquet: instruction/input/output or messages
eval = ["data/eval.jsonl"]             # held-out records; empty: eval_fraction of train
eval_fraction = 0.1

[model]
path = "models/SmolLM2-135M-Instruct"  # a local model folder ("smollm2": the packaged model)
device = "auto"                        # auto (CUDA when present) | cpu | cuda
precision = "auto"                     # auto | fp32 | bf16 | fp16
threads = 0                            # CPU threads (0: all cores)
quantization = ""                      # "" (the run's) | none | 8bit (CUDA) | 4bit (NF4): how the base is held
gradient_checkpointing = false         # true: less activation memory, more time (on if the run asks)
lora_rank = 0                          # train at this LoRA rank (0: the run's); another rank than
                                       # the run's takes part only in `svd` runs (smaller GPU, smaller rank)

[privacy]
require_dp = true                      # refuse rounds without DP-SGD
min_noise_multiplier = 0.5             # refuse rounds with less noise than this: the run's
                                       # dp.noise_multiplier, or the noise this hospital plans
                                       # for its dp.target_epsilon (from its own records)
budget_epsilon = 8.0                   # lifetime epsilon per record, across all runs
delta = 1e-5
ledger = "state/privacy.json"          # back it up, but never restore an older copy: a ledger
                                       # behind the audit trail is refused at start and in rounds

[audit]
log = "state/audit.jsonl"

[release]                              # which global adapter this hospital adopts for its own use
enabled = true                         # judge each round's global adapter on the held-out records
metric = "field_accuracy"              # field_accuracy (higher is better) | loss (held-out answer loss)
max_drop = 0.02                        # reject one more than this worse than the adopted adapter
                                       # (the base model's score before the first): accuracy points,
                                       # or nats per answer token with metric = "loss"
min_metric = 0.0                       # reject below this held-out field accuracy (0: no floor)
max_audit_auc = 0.0                    # > 0: also run the membership-inference audit on the
                                       # candidate; reject when its AUC (point estimate) is above this
audit_members = 200                    # training and held-out records the audit scores (each side)
                                       # adopted adapter and decisions: state/release (`fedtune client release`)

[daemon]
state_dir = "state"                    # also runs.json, connection.json: back it up (README)
health = "127.0.0.1:9094"              # loopback only: GET /health (state as JSON),
                                       # /health/live (200 while running), /health/ready
                                       # (200 only while connected to the coordinator)
log_file = "state/client.log.jsonl"    # structured logs, one JSON object per line
log_max_mb = 50                        # rotate the log past this size (0: never)
log_backups = 5                        # rotated files kept: client.log.jsonl.1 ... .5
"""


def kit_toml(name: str, address: str) -> str:
    """:data:`EXAMPLE` for hospital ``name`` dialling ``address``, with the key paths
    ``fedtune pki hospital --name NAME --out keys`` writes: the startup kit's ``hospital.toml``."""
    from fedtune.security import pki

    text = EXAMPLE.replace("st-elsewhere", name).replace("coordinator.example.org:9092", address)
    data = tomllib.loads(text)
    want = {
        ("hospital", "name"): name,
        ("coordinator", "address"): address,
        ("coordinator", "ca"): "keys/ca.pem",
        ("coordinator", "envelope_key"): "keys/coordinator.pub",
        ("keys", "node_key"): str(pki.NodeKeyFiles.at(Path("keys"), name).key),
        ("keys", "envelope_key"): f"keys/{name}.key",
    }
    for (section, key), value in want.items():
        if data.get(section, {}).get(key) != value:  # EXAMPLE changed shape: a bug here, not the user's
            raise FedTuneError(f"the example hospital.toml no longer fills `{section}.{key}`; fix kit_toml")
    return text
