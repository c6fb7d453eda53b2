"""``fedtune plan``: a hospital's expected peak training memory, the coordinator's merge peak,
and whether they fit a GPU (the formula is :mod:`fedtune.plan`; no torch unless the model
must be converted first)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fedtune.errors import ConfigError

LABELS = {
    "base_weights_mb": "base weights ({weights})",
    "autocast_copies_mb": "autocast bf16 copies of frozen weights",
    "lora_state_mb": "LoRA weights + grads + {optimizer} state",
    "activations_mb": "activations ({ckpt})",
    "logits_mb": "logits over the vocabulary + loss (fp32)",
    "dp_per_sample_mb": "DP per-sample grads of the LoRA layers",
    "runtime_mb": "runtime ({runtime})",
}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The plan's inputs: an experiment file's model, lora, train, dp and federation settings
    (``--config``), then the options given on the command line."""
    got: dict[str, Any] = {
        "model": "smollm2", "quantization": "none", "precision": "bf16", "rank": 8,
        "targets": "q_proj,k_proj,v_proj,o_proj", "batch": 4, "seq": 256, "dp": False, "checkpointing": False,
        "optimizer": "adamw", "hospitals": 3, "strategy": "svd", "dense": "", "dense_limit_mb": 2048.0,
    }  # fmt: skip
    if args.config:
        from fedtune.config import load_config

        cfg = load_config(args.config)
        fed = cfg.federation
        dense = next((d for d in (fed.aggregation, "client_dp" if cfg.client_dp.enabled else "", fed.server_optimizer)
                      if d not in ("mean", "", "none")), "")  # fmt: skip
        got.update(
            model=cfg.model.source, quantization=cfg.model.quantization, rank=cfg.lora.rank,
            precision="fp32" if cfg.model.precision == "fp32" else "bf16", targets=",".join(cfg.lora.target_modules),
            batch=cfg.train.batch_size, seq=cfg.train.max_length, dp=cfg.dp.enabled, optimizer=cfg.train.optimizer,
            checkpointing=cfg.model.gradient_checkpointing, hospitals=cfg.data.hospitals, strategy=fed.strategy,
            dense=dense, dense_limit_mb=fed.svd_dense_limit_mb,
        )  # fmt: skip
    got.update({k: v for k, v in vars(args).items() if k in got and v is not None})
    if not got["model"]:
        raise ConfigError("give a model: `fedtune plan MODEL` or `--config experiment.toml`")
    return got


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The plan as a dict (what ``--json`` prints)."""
    from fedtune import plan

    s = _settings(args)
    _check(args.gpu_gb is None or args.gpu_gb > 0, f"--gpu-gb must be positive, got {args.gpu_gb}")
    targets = tuple(t.strip() for t in str(s["targets"]).split(",") if t.strip())
    _check(bool(targets), "--targets must list module names, e.g. q_proj,v_proj")
    inp = plan.PlanInput(
        shape=plan.model_shape(str(s["model"])), quantization=s["quantization"], precision=s["precision"],
        rank=s["rank"], target_modules=targets, batch=s["batch"], seq=s["seq"], dp=s["dp"],
        checkpointing=s["checkpointing"], optimizer=s["optimizer"], device=args.device,
    )  # fmt: skip
    hospital = plan.hospital_peak(inp)
    merge = plan.merge_peak(
        inp, hospitals=s["hospitals"], strategy=s["strategy"], dense=s["dense"], dense_limit_mb=s["dense_limit_mb"]
    )
    out: dict[str, Any] = {"inputs": {**s, "targets": list(targets), "device": args.device}, "hospital": hospital}
    out["merge"] = merge
    if args.gpu_gb is not None:
        capacity = args.gpu_gb * 1024.0
        out["gpu"] = {
            "gpu_gib": args.gpu_gb,
            "hospital_fits": hospital["total_mb"] <= capacity,
            "hospital_headroom_mb": capacity - hospital["total_mb"],
            "merge_fits": merge["total_mb"] <= capacity and not merge["refused"],
            "merge_headroom_mb": capacity - merge["total_mb"],
        }
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _gib(mb: float) -> str:
    return f"{mb / 1024:7.2f} GiB"


def render(p: dict[str, Any]) -> str:
    """The plan as a table."""
    i, h, m = p["inputs"], p["hospital"], p["merge"]
    weights = {"none": "float32", "4bit": "NF4 + quantization constants", "8bit": "int8 + row scales"}
    fill = {
        "weights": weights[i["quantization"]], "optimizer": "AdamW" if i["optimizer"] == "adamw" else "SGD",
        "ckpt": "gradient checkpointing" if i["checkpointing"] else "all layers kept",
        "runtime": "CUDA context + allocator slack" if i["device"] == "cuda" else "none counted on CPU",
    }  # fmt: skip
    lines = [
        f"fedtune plan: {i['model']}, base {i['quantization']}, compute {i['precision']}, LoRA rank {i['rank']} on "
        f"{','.join(i['targets'])} ({h['lora_params'] / 1e6:.2f}M parameters)",
        f"batch {i['batch']} x {i['seq']} tokens, gradient checkpointing {'on' if i['checkpointing'] else 'off'}, "
        f"DP-SGD {'on' if i['dp'] else 'off'}, device {i['device']}; predictions, not measurements",
        "",
        f"{'a hospital, one training step':44} {'MiB':>9}",
    ]
    for key, label in LABELS.items():
        lines.append(f"  {label.format(**fill):42} {h[key]:9,.0f}")
    lines.append(f"  {'peak':42} {h['total_mb']:9,.0f}  = {_gib(h['total_mb'])}")
    how = {"factored": "svd, factored", "dense": f"svd, dense for {i['dense']}", "plain": i["strategy"]}[m["path"]]
    title = f"the coordinator's merge ({how}, {i['hospitals']} hospitals)"
    lines += ["", f"{title:44} {'MiB':>9}"]
    lines.append(f"  {'adapters received (float32)':42} {m['received_mb']:9,.0f}")
    lines.append(f"  {'global adapters + merge working set':42} {m['working_mb']:9,.0f}")
    lines.append(f"  {'peak':42} {m['total_mb']:9,.0f}  = {_gib(m['total_mb'])}")
    if m["refused"]:
        lines.append(
            f"  refused: one dense copy is {m['dense_copy_mb']:,.0f} MiB, over federation.svd_dense_limit_mb = "
            f"{i['dense_limit_mb']:g}"
        )
    if "gpu" in p:
        g = p["gpu"]
        lines.append("")
        for who, fits, room in (
            ("hospital", "hospital_fits", "hospital_headroom_mb"),
            ("merge", "merge_fits", "merge_headroom_mb"),
        ):
            verdict = "yes" if g[fits] else "NO"
            lines.append(f"fits a {g['gpu_gib']:g} GiB GPU ({who}): {verdict}, headroom {g[room] / 1024:.2f} GiB")
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> int:
    p = make_plan(args)
    print(json.dumps(p, indent=2) if args.json else render(p))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``plan``."""
    cmd = sub.add_parser(
        "plan", help="expected peak memory of a hospital's training and of the merge; does it fit a GPU"
    )
    cmd.add_argument(
        "model", nargs="?", help="llama-0.5b/1b/3b/7b/8b (shapes only), 'smollm2', 'tiny' or a model folder"
    )
    cmd.add_argument("--config", help="read model, lora, train, dp and federation settings from an experiment TOML")
    cmd.add_argument("--quantization", help="none, 8bit or 4bit (default none)")
    cmd.add_argument("--precision", help="fp32 or bf16 compute (default bf16)")
    cmd.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    cmd.add_argument("--targets", help="LoRA target modules, comma-separated (default q_proj,k_proj,v_proj,o_proj)")
    cmd.add_argument("--batch", type=int, help="examples per step (default 4)")
    cmd.add_argument("--seq", type=int, help="tokens per example, all of them answer tokens (default 256)")
    cmd.add_argument("--dp", action=argparse.BooleanOptionalAction, help="DP-SGD (Opacus per-sample gradients)")
    cmd.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, help="gradient checkpointing")
    cmd.add_argument("--optimizer", help="adamw or sgd (default adamw)")
    cmd.add_argument("--hospitals", type=int, help="hospitals whose adapters the coordinator merges (default 3)")
    cmd.add_argument("--strategy", help="fedavg, ffa or svd (default svd)")
    cmd.add_argument(
        "--dense", help="what makes an svd merge dense: median, trimmed_mean, client_dp, fedavgm, fedadam, fedyogi"
    )
    cmd.add_argument("--gpu-gb", type=float, help="GPU memory in GiB: say whether the plan fits")
    cmd.add_argument("--device", default="cuda", help="cuda (default: adds the CUDA runtime) or cpu")
    cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    cmd.set_defaults(func=_plan)
