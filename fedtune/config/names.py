"""The names a config may use, as plain tuples: the config validates against them without
importing torch (the CLI's light commands stay light).

Where a registry owns the names (the code that runs under each name), its keys are the
fact and the tuple here is tested equal to them in ``tests/test_registries.py``:

- ``STRATEGIES``: :data:`fedtune.lora.merge.RULES`; ``LINEAR_STRATEGIES``: the rules whose
  ``linear`` is true (sums of the sites' updates, which secure aggregation needs)
- ``SERVER_OPTIMIZERS``: :data:`fedtune.lora.optimizers.SERVER_OPTIMIZERS`
- ``AGGREGATIONS``: :data:`fedtune.lora.aggregate.COMBINES`
- ``PARTITIONS``: :data:`fedtune.data.partition.PARTITIONS`
- ``WIRE_DTYPES``: :data:`fedtune.wire.arrays.WIRE_DTYPES`

The others name choices that torch or Opacus implement (one branch each, no registry).
"""

from __future__ import annotations

PARTITIONS = ("natural", "iid", "dirichlet")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16")
QUANTIZATIONS = ("none", "8bit", "4bit")  # bitsandbytes: LLM.int8, NF4 with double quantization
STRATEGIES = ("fedavg", "ffa", "svd")
LINEAR_STRATEGIES = ("fedavg", "ffa")  # merges that are sums of the sites' updates (secure aggregation needs one)
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
AGGREGATIONS = ("mean", "trimmed_mean", "median")
ACCOUNTANTS = ("rdp", "prv")  # Opacus's accountants
GRAD_SAMPLE_MODES = ("hooks", "functorch")  # Opacus's per-sample gradients
WIRE_DTYPES = ("float32", "bfloat16", "float16")  # what a delta travels in (`federation.wire_dtype`)
MAX_CLINICAL_HOSPITALS = 1000  # distinct hospital profiles of the embedded task (fedtune.data.clinical.MAX_HOSPITALS)
