"""End-to-end runs on the tiny models: in-process train_main and `python ppo.py` as a user runs it."""
import json
import subprocess
import sys

import torch
from conftest import ROOT, tiny_settings

import ppo


def write_config(tmp_path, settings):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(settings))
    return str(path)


def read_rows(output_dir):
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_train_main_writes_every_output(tiny, tmp_path):
    out = tmp_path / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=3, EVAL_EVERY_N_STEPS=2, SAVE_EVERY_N_STEPS=2)
    assert ppo.train_main([write_config(tmp_path, settings)]) == 0
    assert json.loads((out / "training_config.json").read_text())["MAX_STEPS"] == 3
    assert len(list((out / "logs").glob("training_*.log"))) == 1
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval/reward" in rows[0] and "eval/accuracy" in rows[2] and "eval/reward" in rows[3]
    assert "eval/reward" not in rows[1]
    for key in ("objective/score", "objective/kl", "objective/entropy", "ppo/policy/clipfrac", "ppo/val/clipfrac",
                "ppo/loss/policy", "ppo/loss/value", "ppo/policy/approx_kl", "ppo/val/explained_variance",
                "time/generate", "time/score", "time/forward", "time/update", "lr/policy", "response/eos_rate"):
        assert key in rows[1], key
    samples = [json.loads(line) for line in (out / "logs" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2, 3} and {"prompt", "response", "reward"} <= set(samples[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_3"]
    for name in ("policy/config.json", "policy/model.safetensors", "policy/tokenizer.json",
                 "critic/model.safetensors", "training_state.pt", "config.json"):
        assert (out / "checkpoints" / "step_3" / name).exists(), name
    assert (out / "training_metrics_detailed.png").exists() and (out / "ppo_metrics_with_entropy.png").exists()


def test_weights_move_and_reference_stays(make_trainer):
    trainer = make_trainer(MAX_STEPS=1, EVAL_DATASETS=[])
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in trainer.ref.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())
    assert all(torch.equal(ref_before[k], v) for k, v in trainer.ref.state_dict().items())
    assert trainer.state.optimizer_steps == trainer.cfg.GROUP_EPOCHES


def test_python_ppo_py_as_a_subprocess(tiny, tmp_path):
    """`python ppo.py run.json --FLAG=value` from another working directory, no terminal attached."""
    out = tmp_path / "sub"
    config = write_config(tmp_path, tiny_settings(tiny, out, MAX_STEPS=2, RESUME="ask"))
    result = subprocess.run([sys.executable, str(ROOT / "ppo.py"), config, "--GROUP_EPOCHES=1"], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 1/1" in result.stderr and "PL:" in result.stderr
    assert [r["step"] for r in read_rows(out)] == [0, 1, 2]
    assert (out / "checkpoints" / "step_2" / "training_state.pt").exists()
    assert json.loads((out / "training_config.json").read_text())["GROUP_EPOCHES"] == 1
