"""`fedtune plan`: the table and JSON on a known shape, its one-line refusals, how its components
move with the settings, and one real training peak of a small model against the prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.plan import MB, NF4_BYTES, PlanInput, hospital_peak, merge_peak, model_shape

ROOT = Path(__file__).resolve().parent.parent
# a small LLaMA-style shape whose numbers are easy to check by hand
SMALL = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000,
    "tie_word_embeddings": True, "max_position_embeddings": 512,
}  # fmt: skip


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMALL))
    return folder


def _plan(model: str, **kw: object) -> dict[str, float]:
    return hospital_peak(PlanInput(shape=model_shape(model), device="cpu", **kw))  # type: ignore[arg-type]


def test_shape_counts_match_the_scale_architecture() -> None:
    s = model_shape("llama-8b")
    from fedtune.shapes import SHAPES

    assert s.linear_params() + s.other_params() == SHAPES["llama-8b"].parameters()
    # LoRA rank 16 on q, k, v, o: 32 layers x 16 x ((4096 + 4096) x 2 + (1024 + 4096) x 2)
    assert s.lora_params(16, ("q_proj", "k_proj", "v_proj", "o_proj")) == 32 * 16 * (2 * 8192 + 2 * 5120)


def test_table_and_json_on_a_known_shape(small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", str(small), "--quantization", "4bit", "--rank", "4", "--batch", "2", "--seq", "64"]
    assert main([*argv, "--gpu-gb", "1", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "base weights (NF4 + quantization constants)" in table and "fits a 1 GiB GPU (hospital): yes" in table
    assert main([*argv, "--json", "--device", "cpu"]) == 0
    plan = json.loads(capsys.readouterr().out)
    h = plan["hospital"]
    linear = 4 * (256 * 256 * 2 + 128 * 256 * 2 + 3 * 256 * 512)
    other = 32000 * 256 + 9 * 256
    assert h["base_weights_mb"] == pytest.approx((linear * NF4_BYTES + other * 4) / MB)
    assert h["lora_params"] == 4 * 4 * (2 * 512 + 2 * 384)
    assert h["lora_state_mb"] == pytest.approx(h["lora_params"] * 16 / MB)
    assert h["logits_mb"] == pytest.approx(2 * 64 * 32000 * 4 * 2.9 / MB)
    assert h["runtime_mb"] == 0  # on CPU the measurement's baseline holds the process
    assert h["total_mb"] == pytest.approx(sum(v for k, v in h.items() if k.endswith("_mb") and k != "total_mb"))
    assert plan["merge"]["path"] == "factored" and plan["inputs"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert "gpu" not in plan


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["plan", "no-such-model"], "no-such-model"),
        (["plan", "llama-1b", "--quantization", "3bit"], "--quantization"),
        (["plan", "llama-1b", "--quantization", "8bit", "--device", "cpu"], "--quantization 8bit"),
        (["plan", "llama-1b", "--precision", "fp16"], "--precision"),
        (["plan", "llama-1b", "--rank", "0"], "--rank"),
        (["plan", "llama-1b", "--batch", "0"], "--batch"),
        (["plan", "llama-1b", "--targets", "q_proj,lm_head"], "lora.target_modules"),
        (["plan", "llama-1b", "--gpu-gb", "-1"], "--gpu-gb"),
        (["plan", "llama-1b", "--hospitals", "0"], "--hospitals"),
        (["plan", "llama-1b", "--strategy", "mean"], "--strategy"),
        (["plan", "llama-1b", "--dense", "sometimes"], "--dense"),
        (["plan", "llama-1b", "--device", "tpu"], "--device"),
    ],
)
def test_bad_input_is_one_line_naming_the_option(
    argv: list[str], names: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtune: error:") and "\n" not in err and names in err


def test_a_folder_without_config_and_a_bad_experiment_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    bad = tmp_path / "exp.toml"
    bad.write_text('[model]\nquantization = "2bit"\n')
    assert main(["plan", "--config", str(bad)]) == 2
    assert "model.quantization" in capsys.readouterr().err


def test_config_file_settings_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(
        '[model]\nsource = "llama-7b"\nquantization = "4bit"\ngradient_checkpointing = true\n'
        "[lora]\nrank = 16\n[train]\nbatch_size = 2\nmax_length = 512\n"
        '[federation]\nstrategy = "svd"\nserver_optimizer = "fedadam"\n[data]\nhospitals = 4\n'
    )
    assert main(["plan", "--config", str(exp), "--json", "--batch", "1"]) == 0
    plan = json.loads(capsys.readouterr().out)
    i = plan["inputs"]
    assert (i["model"], i["quantization"], i["rank"], i["seq"], i["batch"]) == ("llama-7b", "4bit", 16, 512, 1)
    assert i["checkpointing"] is True and plan["merge"]["path"] == "dense" and plan["merge"]["refused"] is True


def test_components_move_the_way_they_must() -> None:
    fp32, bf16, nf4 = (
        _plan("llama-1b", precision=p, quantization=q)
        for p, q in [("fp32", "none"), ("bf16", "none"), ("bf16", "4bit")]
    )
    # fedtune keeps float32 weights under bf16 autocast: the same base, plus the bf16 copies autocast keeps
    assert nf4["base_weights_mb"] < bf16["base_weights_mb"] == fp32["base_weights_mb"]
    assert fp32["autocast_copies_mb"] == 0 < nf4["autocast_copies_mb"] < bf16["autocast_copies_mb"]
    assert nf4["total_mb"] < fp32["total_mb"]
    ckpt = _plan("llama-1b", precision="bf16", checkpointing=True)
    assert ckpt["activations_mb"] < bf16["activations_mb"] / 4 and ckpt["logits_mb"] == bf16["logits_mb"]
    dp = _plan("llama-1b", precision="bf16", dp=True, batch=8)
    assert (
        bf16["dp_per_sample_mb"]
        == 0
        < _plan("llama-1b", precision="bf16", dp=True)["dp_per_sample_mb"]
        < dp["dp_per_sample_mb"]
    )
    assert _plan("llama-1b", seq=512)["activations_mb"] == pytest.approx(
        2 * _plan("llama-1b", seq=256)["activations_mb"]
    )
    cuda = hospital_peak(PlanInput(shape=model_shape("llama-1b")))
    assert cuda["runtime_mb"] > 1000 and cuda["total_mb"] > bf16["total_mb"]


def test_merge_memory_grows_with_hospitals_and_dense_is_refused() -> None:
    p = PlanInput(
        shape=model_shape("llama-7b"),
        rank=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    )
    four, sixteen = merge_peak(p, hospitals=4), merge_peak(p, hospitals=16)
    assert four["path"] == "factored" and four["total_mb"] < sixteen["total_mb"] < 4 * 1024
    assert sixteen["received_mb"] == pytest.approx(4 * four["received_mb"])  # 16 x a 160 MB float32 adapter
    assert 150 < four["received_mb"] / 4 < 165
    dense = merge_peak(p, hospitals=4, dense="median")
    assert dense["path"] == "dense" and dense["refused"] and dense["total_mb"] > 100 * four["total_mb"]
    assert merge_peak(p, hospitals=4, strategy="fedavg")["path"] == "plain"


def test_a_real_training_peak_is_within_tolerance(tmp_path: Path) -> None:
    """One fp32 training step of a small random model in a fresh process (benchmarks/plan.py's
    worker): its peak resident memory above its imports against the prediction, within 20%."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "small"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(
            LlamaConfig(**{k: v for k, v in SMALL.items() if k not in ("model_type", "architectures")})
        ).save_pretrained(folder)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plan.py"), "--worker", "fp32", "--model", str(folder)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*cmd, "--batch", "4", "--seq", "128"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])["measured_mb"]
    predicted = _plan(str(folder), precision="fp32", rank=16, batch=4, seq=128)["total_mb"]
    assert predicted > 150  # the logits alone: 4 x 128 x 32000 float32, several copies
    print(f"small model, fp32, 4 x 128: predicted {predicted:.0f} MB, measured {measured:.0f} MB")
    assert abs(predicted / measured - 1) < 0.20, (predicted, measured)


def test_the_readme_plan_line_runs_as_written_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's `fedtune plan` command, taken from the README itself, prints the 8B row the
    README quotes (14.8 GiB with checkpointing, 2.9 GiB for 16 hospitals' merge)."""
    import re
    import shlex

    from fedtune.cli import main

    readme = (ROOT / "README.md").read_text()
    (line,) = re.findall(r"^`(fedtune plan llama-8b [^`]+)`", readme, flags=re.M)
    assert main(shlex.split(line)[1:]) == 0
    out = capsys.readouterr().out
    row = re.search(r"^\| Llama-3\.1-8B \(`llama-8b`\) \| ([\d.]+) GiB \|.*\| ([\d.]+) GiB \|$", readme, flags=re.M)
    assert row is not None
    hospital, merge = re.findall(r"peak\s+[\d,]+\s+=\s+([\d.]+) GiB", out)
    assert f"{float(hospital):.1f}" == row.group(1) and f"{float(merge):.1f}" == row.group(2)
    assert "fits a 24 GiB GPU (hospital): yes" in out
