"""Faults that reach one process of several (torchrun, 2 processes over gloo): a SIGKILL at a random
moment of a phase, a SIGTERM to one process only (the second audit's N3), and a checkpoint write that
fails on the main process (a full disk, a read-only folder). In each case every process exits within a
bounded time with a clear message, no checkpoint is left half-written, and a run resumed with
RESUME=yes on 2 processes ends exactly where an uninterrupted 2-process run ends.

Each launch is bounded by a timeout, so a hang fails the test instead of stalling CI; the processes run
with DISTRIBUTED_TIMEOUT = 60 (seconds a process waits in a collective for the others)."""
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TORCHRUN, tiny_settings
from safetensors.torch import load_file

import ppo

LAUNCH_TIMEOUT = 240
BOUND = 60                      # seconds the survivor of a fault may take to exit
PORTS = iter(range(29631, 29700))

# Runs ppo.train_main like `python ppo.py run.json ...`, with one fault armed from PPO_FAULT: on process
# `rank`, when `phase` of PPO step `step` begins, `signal` reaches this process after `delay` seconds
# (a timer thread: a random moment inside the phase), and the moment is written to `mark`.
DRIVER = r'''
import json, os, resource, signal, sys, threading, time
from pathlib import Path
sys.path.insert(0, {root!r})
import ppo
fault = json.loads(os.environ.get("PPO_FAULT", "null"))
rank = int(os.environ["RANK"])


def strike():
    with open(fault["mark"], "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), getattr(signal, "SIG" + fault["signal"]))


def arm(now):
    if now:
        threading.Timer(fault["delay"], strike).start() if fault["delay"] else strike()


def patch(owner, name, when, after=False):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        hit = when(*args, **kwargs)
        if not after:
            arm(hit)
        result = real(*args, **kwargs)
        if after:
            arm(hit)
        return result
    setattr(owner, name, wrapped)


def at_step(trainer):
    return trainer.state.global_step + 1 == fault["step"]


if fault and rank == fault["rank"]:
    phase = fault["phase"]
    if phase == "generate":        # a training rollout (the evaluation passes do_sample)
        patch(ppo.PPOTrainer, "generate_response", lambda self, *a, **k: at_step(self) and "do_sample" not in k)
    elif phase == "update":
        patch(ppo.PPOTrainer, "ppo_update", lambda self, *a, **k: at_step(self))
    elif phase == "write":         # the main process, after the policy of step_N is written, before the rest
        patch(ppo, "write_model", lambda model, tok, folder, *a: f".tmp_step_{{fault['step']}}" in str(folder)
              and Path(folder).name == "policy", after=True)
    elif phase == "wait":          # another process, while the main process writes the checkpoint
        patch(ppo, "write_checkpoint", lambda path, *a: path.name == f"step_{{fault['step']}}", after=True)
    elif phase == "disk_full":     # files written from here on may not pass `limit` bytes (EFBIG)
        def full(*args, **kwargs):
            if args[0].name == f"step_{{fault['step']}}":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fault["limit"], fault["limit"]))
            return False
        patch(ppo, "write_checkpoint", full)
    elif phase == "read_only":     # the checkpoints folder becomes read-only before step_N is written
        def read_only(*args, **kwargs):
            if args[0].name == f"step_{{fault['step']}}":
                os.chmod(args[0].parent, 0o555)
            return False
        patch(ppo, "write_checkpoint", read_only)
sys.exit(ppo.train_main(sys.argv[1:]))
'''


def settings(tiny, out):
    return tiny_settings(tiny, out, BATCH_SIZE=2, GROUP_SIZE=2, GROUP_EPOCHES=1, MAX_NEW_TOKENS=6, MAX_STEPS=3,
                         SAVE_EVERY_N_STEPS=1, EVAL_EVERY_N_STEPS=1, MAX_EVAL_SAMPLES=4, MAX_TRAIN_SAMPLES=24,
                         DISTRIBUTED_TIMEOUT=60, RESUME="yes")


def without_root_overrides():
    """In the child, before exec: drop the capabilities that let root ignore a folder's permissions
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from the bounding set, so a read-only folder is read-only for
    it too (an exec'd root process gets the bounding set as its capabilities)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:          # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def launch(folder: Path, run_settings: dict, fault=None, read_only=False, extra=()):
    """torchrun --nproc_per_node 2 of the driver on these settings; returns (exit status, output, seconds
    from the fault's strike to torchrun's exit, or None)."""
    config = folder / "run.json"
    config.write_text(json.dumps(run_settings))
    driver = folder / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PPO_FAULT": json.dumps(fault)}
    result = subprocess.run(TORCHRUN + [str(next(PORTS)), str(driver), str(config), *extra], cwd=folder, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                            preexec_fn=without_root_overrides if read_only and os.geteuid() == 0 else None)
    end = time.time()
    mark = Path(fault["mark"]) if fault and "mark" in fault else None
    took = end - float(mark.read_text()) if mark and mark.exists() else None
    return result.returncode, result.stdout + result.stderr, took


def rows(out: Path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "throughput/"))}
            for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path, step: int) -> dict:
    folder = out / "checkpoints" / f"step_{step}"
    return {part: load_file(folder / part / "model.safetensors") for part in ("policy", "critic")}


def assert_checkpoints_whole(out: Path):
    """Every folder named step_N is a complete checkpoint that loads without running code."""
    found = ppo.list_checkpoints(out)
    named = sorted(p for p in (out / "checkpoints").glob("step_*"))
    assert [p for _, p in found] == named, f"an incomplete step_N folder: {named}"
    for _, path in found:
        ppo.load_checkpoint_state(path, ppo.make_config(json.loads((path / "config.json").read_text())))
        for part in ("policy", "critic"):
            load_file(path / part / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    """The reference: the same 3-step run on 2 processes, never interrupted."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    out = folder / "out"
    code, output, _ = launch(folder, settings(tiny, out))
    assert code == 0, output[-4000:]
    return {"rows": rows(out), "weights": weights(out, 3)}


def assert_same_run(out: Path, reference: dict, skip_eval_at=None):
    got = rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in reference["rows"]]
    for mine, theirs in zip(got, reference["rows"]):
        if mine["step"] == skip_eval_at:           # the interrupted step was not evaluated
            theirs = {k: v for k, v in theirs.items() if not k.startswith("eval/")}
        assert mine == theirs, f"step {mine['step']}"
    for part, tensors in weights(out, 3).items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, reference["weights"][part][name]), f"{part} {name}"


@pytest.mark.parametrize("rank, phase", [(1, "generate"), (0, "update"), (0, "write"), (1, "wait")])
def test_sigkill_of_one_process_fails_the_run_cleanly_and_resume_is_exact(tiny, tmp_path, uninterrupted, rank,
                                                                          phase):
    """SIGKILL one process at a random moment of step 2's generation or update, in the middle of the main
    process's checkpoint write (after the policy, before the rest), or while another process waits for that
    write. The survivor exits within BOUND seconds saying that another process died; no step_N folder is
    half-written; RESUME=yes on 2 processes then finishes the run exactly as the uninterrupted run."""
    seed = random.randrange(10 ** 6)
    delay = round(random.Random(seed).uniform(0.0, 0.08), 3) if phase in ("generate", "update") else 0
    out = tmp_path / "out"
    fault = dict(rank=rank, phase=phase, step=2, signal="KILL", delay=delay, mark=str(tmp_path / "mark"))
    code, output, took = launch(tmp_path, settings(tiny, out), fault)
    context = f"seed {seed}, delay {delay}:\n{output[-5000:]}"
    assert code != 0 and took is not None, context
    assert took < BOUND, f"the survivor took {took:.1f} s to exit; {context}"
    assert "Another process of this run died or stopped answering" in output, context
    assert 'ppo.py", line' not in output, context                    # no traceback of ours (torchrun prints its own)
    assert_checkpoints_whole(out)
    assert ppo.list_checkpoints(out)[-1][0] in (1, 2)
    print(f"{phase} on rank {rank} (delay {delay} s): the survivor exited {took:.1f} s after the SIGKILL; "
          f"resuming from {ppo.list_checkpoints(out)[-1][1].name}")
    code, output, _ = launch(tmp_path, settings(tiny, out))
    assert code == 0, output[-5000:]
    assert not list((out / "checkpoints").glob(".tmp_*")), "a half-written checkpoint was left behind"
    assert_same_run(out, uninterrupted)


def test_sigterm_to_one_process_saves_a_checkpoint_and_both_exit(tiny, tmp_path, uninterrupted):
    """N3: SIGTERM reaches process 0 only, during step 2's update, with an evaluation due at that step. Both
    processes agree to stop: no evaluation on one and not the other (the audit's deadlock), step_2 is saved,
    both exit, and the resumed run ends as the uninterrupted one (its step 2 was not evaluated)."""
    out = tmp_path / "out"
    fault = dict(rank=0, phase="update", step=2, signal="TERM", delay=0, mark=str(tmp_path / "mark"))
    code, output, took = launch(tmp_path, settings(tiny, out), fault)
    assert code != 0 and took is not None and took < BOUND, output[-5000:]
    assert output.count("Interrupted by") == 2, output[-5000:]          # both processes, and no hang
    assert "Interrupted by SIGTERM; checkpoint:" in output and "another process" in output, output[-5000:]
    assert ppo.list_checkpoints(out)[-1][0] == 2
    assert_checkpoints_whole(out)
    code, output, _ = launch(tmp_path, settings(tiny, out))
    assert code == 0, output[-5000:]
    assert_same_run(out, uninterrupted, skip_eval_at=2)


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_a_failed_checkpoint_write_fails_every_process_with_one_message(tiny, tmp_path, fault):
    """The main process cannot write step_2 (its files may not grow past 40 KB: a full disk; or the
    checkpoints folder turns read-only): every process exits with status 1 and the same clear message, and
    step_1 stays complete and loadable."""
    armed = dict(rank=0, phase=fault, step=2, signal="KILL", delay=0, limit=40_000)
    code, output, _ = launch(tmp_path, settings(tiny, tmp_path / "out"), armed, read_only=fault == "read_only")
    out = tmp_path / "out"
    os.chmod(out / "checkpoints", 0o755)
    messages = [line for line in output.splitlines() if "Could not write checkpoint" in line]
    assert code != 0 and len(messages) == 2, output[-5000:]             # one per process
    assert len({m[m.index("Could not write"):] for m in messages}) == 1, messages
    assert ("File too large" if fault == "disk_full" else "Permission denied") in messages[0]
    assert 'ppo.py", line' not in output, output[-5000:]
    assert [s for s, _ in ppo.list_checkpoints(out)] == [1]
    assert_checkpoints_whole(out)
    assert not (out / "checkpoints" / "step_2").exists()
