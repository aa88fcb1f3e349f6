"""DeepSpeed ZeRO-2 through `accelerate launch --config_file configs/deepspeed_zero2.yaml`, run here on CPU over gloo
with 2 processes: it trains like DDP, writes one set of outputs, and resumes exactly from per-process optimizer parts."""
import json
import os
import shutil
import sys

import pytest
import torch
from conftest import ROOT, TORCHRUN, launch, tiny_settings
from safetensors.torch import load_file

import ppo

pytest.importorskip("deepspeed")

DEEPSPEED = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
             str(ROOT / "configs" / "deepspeed_zero2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
             "--main_process_port"]
NO_CLIPPING = 1e9             # DeepSpeed clips the joint norm of both models, DDP each model's: compare unclipped


def deepspeed(args, tmp_path, port, script=ROOT / "ppo.py"):
    return launch(DEEPSPEED, [script, *args], tmp_path, port)


def weights(step_dir):
    return {f"{part}.{k}": v for part in ("policy", "critic")
            for k, v in load_file(step_dir / part / "model.safetensors").items()}


def rows(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def write(tmp_path, name, settings):
    path = tmp_path / name
    path.write_text(json.dumps(settings))
    return path


def test_zero2_trains_like_ddp_and_writes_one_set_of_outputs(tiny, tmp_path):
    settings = dict(MAX_STEPS=1, SAVE_EVERY_N_STEPS=1, MAX_GRAD_NORM=NO_CLIPPING, EVAL_DATASETS=[])
    ds_out, ddp_out = tmp_path / "ds", tmp_path / "ddp"
    result = deepspeed([write(tmp_path, "ds.json", tiny_settings(tiny, ds_out, **settings))], tmp_path, 29571)
    assert "DeepSpeed ZeRO stage 2" in result.stderr and "on 2 process(es)" in result.stderr
    launch(TORCHRUN, [ROOT / "ppo.py", write(tmp_path, "ddp.json", tiny_settings(tiny, ddp_out, **settings))],
           tmp_path, 29572)
    assert len(list((ds_out / "logs").glob("training_*.log"))) == 1 and [r["step"] for r in rows(ds_out)] == [1]
    step = ds_out / "checkpoints" / "step_1"
    assert sorted(p.name for p in step.glob("optimizer_rank_*.pt")) == ["optimizer_rank_0.pt", "optimizer_rank_1.pt"]
    assert torch.load(step / "training_state.pt", weights_only=True)["optimizer"] is None
    assert not list((ds_out / "checkpoints").glob(".tmp_*"))
    ds, ddp = weights(step), weights(ddp_out / "checkpoints" / "step_1")
    start = {f"policy.{k}": v for k, v in load_file(os.path.join(tiny["policy"], "model.safetensors")).items()}
    assert ds.keys() == ddp.keys()
    assert any(not torch.equal(ds[k], start[k]) for k in start), "DeepSpeed did not train the policy"
    for name in ds:                         # 2 optimizer steps on the same rollout: same update up to rounding
        torch.testing.assert_close(ds[name], ddp[name], atol=1e-6, rtol=1e-4, msg=name)
    assert rows(ds_out)[0]["ppo/loss/value"] == pytest.approx(rows(ddp_out)[0]["ppo/loss/value"], rel=1e-4)


def untimed(row):
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}


def test_zero2_resumes_exactly(tiny, tmp_path, capsys):
    """3 steps straight against 2 + resume + 1: the same metrics and bit-identical weights (a constant
    learning rate: the run stopped by --MAX_STEPS=2 would otherwise schedule its rate over 2 steps)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = dict(MAX_STEPS=3, SAVE_EVERY_N_STEPS=1, EVAL_DATASETS=[], USE_LR_SCHEDULER=False)
    deepspeed([write(tmp_path, "a.json", tiny_settings(tiny, straight, **base))], tmp_path, 29573)
    config = write(tmp_path, "b.json", tiny_settings(tiny, resumed, **base))
    deepspeed([config, "--MAX_STEPS=2"], tmp_path, 29574)
    result = deepspeed([config, "--RESUME=yes"], tmp_path, 29575)
    assert "Resumed from" in result.stderr and "step 2" in result.stderr
    assert weights(straight / "checkpoints" / "step_3").keys() == weights(resumed / "checkpoints" / "step_3").keys()
    for name, tensor in weights(straight / "checkpoints" / "step_3").items():
        assert torch.equal(tensor, weights(resumed / "checkpoints" / "step_3")[name]), name
    assert [untimed(r) for r in rows(straight)] == [untimed(r) for r in rows(resumed)]
    for rank in (0, 1):
        a = torch.load(straight / "checkpoints" / "step_3" / f"optimizer_rank_{rank}.pt", weights_only=True)
        b = torch.load(resumed / "checkpoints" / "step_3" / f"optimizer_rank_{rank}.pt", weights_only=True)
        assert all(torch.equal(x, y) for x, y in zip(a["fp32"], b["fp32"]))

    # A DeepSpeed checkpoint resumed without DeepSpeed: one clear error, nothing touched.
    copy = tmp_path / "copy"
    shutil.copytree(resumed, copy)
    before = (copy / "checkpoints" / "step_3" / "training_state.pt").read_bytes()
    capsys.readouterr()
    code = ppo.train_main([str(config), f"--OUTPUT_DIR={copy}", "--RESUME=yes", "--MAX_STEPS=4"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "written under DeepSpeed" in err and "accelerate launch --config_file" in err, err
    assert (copy / "checkpoints" / "step_3" / "training_state.pt").read_bytes() == before
    assert ppo.list_checkpoints(copy)[-1][0] == 3


NAN_DRIVER = """
import sys
sys.path.insert(0, {root!r})
import ppo


class NaNLoss(ppo.DeepSpeedBackend):
    calls = 0

    def backward(self, loss, last):         # optimizer step 3 (step 2's first) gets a NaN gradient on rank 1
        NaNLoss.calls += 1
        if NaNLoss.calls == 3 and self.rank == 1:
            loss = loss * float("nan")
        super().backward(loss, last)


ppo.DeepSpeedBackend = NaNLoss
sys.exit(ppo.train_main())
"""


def test_zero2_skips_a_non_finite_gradient(tiny, tmp_path):
    out = tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(NAN_DRIVER.format(root=str(ROOT)))
    config = write(tmp_path, "nan.json", tiny_settings(tiny, out, MAX_STEPS=3, SAVE_EVERY_N_STEPS=1,
                                                       EVAL_DATASETS=[]))
    result = deepspeed([config], tmp_path, 29576, script=driver)
    assert "step 2: non-finite gradient" in result.stderr and "skipped" in result.stderr
    assert [r["ppo/skipped_optimizer_steps"] for r in rows(out)] == [0, 1, 0]
    state = torch.load(out / "checkpoints" / "step_3" / "training_state.pt", weights_only=True)["state"]
    assert state["optimizer_steps"] == 3 * 2 - 1
    for step in (1, 2, 3):
        assert all(torch.isfinite(t).all() for t in weights(out / "checkpoints" / f"step_{step}").values())
        for rank in (0, 1):
            part = torch.load(out / "checkpoints" / f"step_{step}" / f"optimizer_rank_{rank}.pt", weights_only=True)
            assert all(torch.isfinite(t).all() for t in part["fp32"])
            assert all(torch.isfinite(v).all() for s in part["base"]["state"].values() for v in s.values())
