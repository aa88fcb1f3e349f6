"""Checkpoints and resuming on the tiny models: exact resume, crash-safe saves, rotation, signals, the y/n
prompt, manual loading, and one clear error for a checkpoint that cannot be used."""
import hashlib
import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_settings
from safetensors.torch import load_file

import ppo

PROMPT = "是否从检查点恢复训练？(y/n): "
CHILD_TIMEOUT = 300


# -- helpers --------------------------------------------------------------------------------------
def write_config(folder: Path, settings: dict, name: str = "run.json") -> str:
    path = folder / name
    path.write_text(json.dumps(settings))
    return str(path)


def metrics_lines(out: Path):
    return (out / "logs" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()


def read_rows(out: Path):
    return [json.loads(line) for line in metrics_lines(out)]


def steps_of(out: Path):
    return [row["step"] for row in read_rows(out)]


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))}


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step}"


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: tensor {key} differs"


def tree_digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def training_log_text(out: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((out / "logs").glob("training_*.log")))


def wait_for(predicate, proc, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    """A finished 2-step run with checkpoints step_1 and step_2 (evaluations at steps 0 and 2), and the
    trainer's final weights. Tests copy its OUTPUT_DIR before touching it."""
    out = tmp_path_factory.mktemp("base") / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=2, SAVE_EVERY_N_STEPS=1)
    trainer = ppo.PPOTrainer(**settings)
    assert trainer.train() == "max_steps"
    return {"out": out, "settings": settings,
            "policy": {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()},
            "critic": {k: v.detach().clone() for k, v in trainer.critic.state_dict().items()}}


def copy_run(base, dest: Path) -> Path:
    shutil.copytree(base["out"], dest)
    return dest


# -- 1. exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["within_one_epoch", "across_an_epoch_boundary"])
def test_resume_is_bit_exact(tiny, tmp_path, case):
    """6 steps straight == 3 steps, resume from step_3, 3 steps: same metrics rows, same weights, same state."""
    extra = dict(MAX_TRAIN_SAMPLES=16, NUM_EPOCHES=2) if case == "across_an_epoch_boundary" else {}

    def settings(out):
        return tiny_settings(tiny, out, MAX_STEPS=6, SAVE_EVERY_N_STEPS=3, USE_LR_SCHEDULER=True, WARMUP_STEPS=2,
                             ADAPTIVE_KL=True, REWARD_NORMALIZATION=True, EVAL_EVERY_N_STEPS=2, EVAL_GREEDY=False,
                             **extra)

    a, b = tmp_path / "a", tmp_path / "b"
    straight = ppo.PPOTrainer(**settings(a))
    assert straight.train() == "max_steps"
    assert [s for s, _ in ppo.list_checkpoints(a)] == [3, 6]
    rows_a = read_rows(a)
    assert [r["step"] for r in rows_a] == [0, 1, 2, 3, 4, 5, 6]
    # The run really exercises the restored state: a moving lr, a moving beta, reward moments, sampled evals.
    assert len({r["lr/policy"] for r in rows_a[1:]}) > 1
    assert straight.state.kl_coef != straight.cfg.KL_COEF and straight.state.reward_count > 0
    assert all("eval/reward" in rows_a[s] for s in (0, 2, 4, 6)) and "eval/reward" not in rows_a[3]
    epochs = [r["epoch"] for r in rows_a[1:]]
    if case == "across_an_epoch_boundary":
        assert epochs[2] < 1 and epochs[-1] > 1            # step_3 inside epoch 1, step 6 inside epoch 2
    else:
        assert epochs[-1] < 1

    shutil.copytree(a, b)
    abandoned = tree_digest(checkpoint(b, 6))
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(b, 3)), **settings(b))
    assert resumed.state.global_step == 3
    assert resumed.train() == "max_steps"
    # the run's own step_6 was written (the abandoned one is kept aside, untouched)
    aside = list((b / "checkpoints").glob("abandoned_*"))
    assert len(aside) == 1 and tree_digest(aside[0] / "step_6") == abandoned
    assert f"Checkpoint saved: {checkpoint(b, 6)}" in training_log_text(b).split("Resumed from")[-1]

    rows_b = read_rows(b)
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4, 5, 6]       # b's old rows 4..6 dropped and rewritten
    assert metrics_lines(b)[:4] == metrics_lines(a)[:4]
    for row_a, row_b in zip(rows_a, rows_b):
        assert without_timing(row_a) == without_timing(row_b), f"step {row_a['step']}"
    for part in ("policy", "critic"):
        assert_same_tensors(load_file(checkpoint(a, 6) / part / "model.safetensors"),
                            load_file(checkpoint(b, 6) / part / "model.safetensors"), part)
    state_a = torch.load(checkpoint(a, 6) / "training_state.pt", weights_only=True)
    state_b = torch.load(checkpoint(b, 6) / "training_state.pt", weights_only=True)
    assert state_a["state"] == state_b["state"]
    opt_a, opt_b = state_a["optimizer"], state_b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index in opt_a["state"]:
        assert_same_tensors(opt_a["state"][index], opt_b["state"][index], f"optimizer state {index}")


# -- 2. a crash during the save ---------------------------------------------------------------------
class InjectedCrash(Exception):
    pass


def inject_crash(monkeypatch, trainer, stage):
    """Make the save of the next checkpoint fail at `stage`, after writing part of that stage's files."""
    def in_tmp(path: Path) -> bool:
        return any(part.startswith(".tmp_step_") for part in Path(path).parts)

    if stage in ("policy", "critic"):
        real = ppo.write_model

        def write_model(model, tokenizer, folder, dtype=None):
            if Path(folder).name == stage:
                model.save_pretrained(folder, safe_serialization=True)       # weights written, no tokenizer
                raise InjectedCrash(stage)
            return real(model, tokenizer, folder, dtype)
        monkeypatch.setattr(ppo, "write_model", write_model)
    elif stage == "training_state":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            size = os.path.getsize(f)
            with open(f, "r+b") as handle:                                    # a torn file
                handle.truncate(size // 2)
            raise InjectedCrash(stage)
        monkeypatch.setattr(ppo.torch, "save", save)
    elif stage == "config":
        real_write_text = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name == "config.json" and in_tmp(self):
                real_write_text(self, data[:len(data) // 2], *args, **kwargs)
                raise InjectedCrash(stage)
            return real_write_text(self, data, *args, **kwargs)
        monkeypatch.setattr(ppo.Path, "write_text", write_text)
    elif stage == "fsync":
        def fsync_tree(folder):
            raise InjectedCrash(stage)
        monkeypatch.setattr(ppo, "fsync_tree", fsync_tree)
    elif stage == "rename":
        real_rename = Path.rename

        def rename(self, target):
            if self.name.startswith(".tmp_step_"):
                raise InjectedCrash(stage)
            return real_rename(self, target)
        monkeypatch.setattr(ppo.Path, "rename", rename)
    else:
        raise AssertionError(stage)


@pytest.mark.parametrize("stage", ["policy", "critic", "training_state", "config", "fsync", "rename"])
def test_crash_during_save_keeps_previous_checkpoint(base, tmp_path, monkeypatch, stage):
    out = copy_run(base, tmp_path / "run")
    shutil.rmtree(checkpoint(out, 2))
    settings = {**base["settings"], "OUTPUT_DIR": str(out), "EVAL_DATASETS": []}
    trainer = ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, 1)), **settings)
    inject_crash(monkeypatch, trainer, stage)
    with pytest.raises(InjectedCrash):
        trainer.train()                                   # step 2, then its save crashes
    monkeypatch.undo()
    assert trainer.state.global_step == 2

    ckpts = out / "checkpoints"
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1))]
    assert not checkpoint(out, 2).exists()
    # at most a hidden leftover, and the abandoned run's best/ (from step 2) set aside
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith((".", "abandoned_"))] == ["step_1"]
    assert ppo.choose_resume(ppo.make_config({**settings, "RESUME": "yes"}))[0] == str(checkpoint(out, 1))
    previous = ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, 1)), **settings)
    assert previous.state.global_step == 1

    assert trainer.save_checkpoint() == checkpoint(out, 2)   # the leftover does not block a later save
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1)), (2, checkpoint(out, 2))]
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("abandoned_")) == ["step_1", "step_2"]
    assert ppo.load_checkpoint_state(checkpoint(out, 2), trainer.cfg)["state"]["global_step"] == 2
    assert_same_tensors(load_file(checkpoint(out, 2) / "policy" / "model.safetensors"),
                        {k: v.contiguous() for k, v in trainer.policy.state_dict().items()}, "policy")


# -- 3. kill -9 while saving ------------------------------------------------------------------------
DRIVER = """
import sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(2)
import ppo

real_save = ppo.torch.save
calls = []


def slow_save(obj, f, *args, **kwargs):
    calls.append(str(f))
    real_save(obj, f, *args, **kwargs)
    if len(calls) == 2:
        print("SAVING_SECOND_CHECKPOINT", f, flush=True)
        time.sleep(600)


ppo.torch.save = slow_save
sys.exit(ppo.train_main(sys.argv[1:]))
"""


def test_kill_9_while_saving_leaves_previous_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=3, SAVE_EVERY_N_STEPS=1, EVAL_DATASETS=[])
    config = write_config(tmp_path, settings)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, str(driver), config], cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], CHILD_TIMEOUT)
            line = proc.stdout.readline() if ready else ""
            assert line.startswith("SAVING_SECOND_CHECKPOINT"), (line, (tmp_path / "stderr.txt").read_text()[-3000:])
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()

    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp_step_2" / "training_state.pt").exists()      # killed in the middle of step 2's save
    assert not checkpoint(out, 2).exists()
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1))]
    assert ppo.choose_resume(ppo.make_config({**settings, "RESUME": "yes"}))[0] == str(checkpoint(out, 1))
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, 1)), **settings)
    assert resumed.state.global_step == 1 and resumed.state.position == settings["BATCH_SIZE"]


# -- 4. rotation ------------------------------------------------------------------------------------
def record_checkpoint_deletions(monkeypatch, out: Path) -> list:
    """(deleted step, complete checkpoints listed just before the deletion) for every checkpoint removed."""
    deletions = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.parent == out / "checkpoints" and path.name.startswith("step_"):
            deletions.append((int(path.name[5:]), [s for s, _ in ppo.list_checkpoints(out)]))
        return real_rmtree(path, *args, **kwargs)
    monkeypatch.setattr(ppo.shutil, "rmtree", rmtree)
    return deletions


def test_rotation_keeps_newest_and_never_zero(make_trainer, tmp_path, monkeypatch):
    out = tmp_path / "out"
    deletions = record_checkpoint_deletions(monkeypatch, out)
    trainer = make_trainer(MAX_STEPS=4, SAVE_EVERY_N_STEPS=1, SAVE_TOTAL_LIMIT=1, EVAL_DATASETS=[])
    assert trainer.train() == "max_steps"
    # Each old checkpoint is deleted only once the newer one is complete.
    assert deletions == [(1, [1, 2]), (2, [2, 3]), (3, [3, 4])]
    assert ppo.list_checkpoints(out) == [(4, checkpoint(out, 4))]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4"]


class ScriptedEval(ppo.PPOTrainer):
    """The real trainer, with evaluate() returning a scripted reward per step: the best is step 1."""
    rewards = {0: 0.0, 1: 5.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}

    def evaluate(self, eval_prompts):
        return {"reward": self.rewards[self.state.global_step]}


def test_rotation_keeps_best_checkpoint_with_early_stopping(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    deletions = record_checkpoint_deletions(monkeypatch, out)
    trainer = ScriptedEval(**tiny_settings(tiny, out, MAX_STEPS=5, SAVE_EVERY_N_STEPS=1, SAVE_TOTAL_LIMIT=1,
                                           EVAL_EVERY_N_STEPS=1, EARLY_STOPPING_PATIENCE=2))
    assert trainer.train() == "early_stopping"
    assert trainer.state.global_step == 3 and trainer.state.best_step == 1
    assert deletions == [(2, [1, 2, 3])]
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1)), (3, checkpoint(out, 3))]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_3"]
    assert_same_tensors(load_file(out / "best" / "model.safetensors"),
                        load_file(checkpoint(out, 1) / "policy" / "model.safetensors"), "best policy")


# -- 5. SIGTERM ---------------------------------------------------------------------------------------
def step_rows_written(out: Path) -> int:
    path = out / "logs" / "metrics.jsonl"
    if not path.exists():
        return 0
    complete = path.read_text(encoding="utf-8").split("\n")[:-1]
    return sum(json.loads(line)["step"] >= 1 for line in complete)


def test_sigterm_saves_last_step_and_resume_finishes(tiny, tmp_path):
    out = tmp_path / "run"
    settings = tiny_settings(tiny, out, MAX_STEPS=5, SAVE_EVERY_N_STEPS=0, EVAL_DATASETS=[])
    config = write_config(tmp_path, settings)
    with open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "ppo.py"), config], cwd=tmp_path,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: step_rows_written(out) >= 2, proc, CHILD_TIMEOUT, "2 step rows in metrics.jsonl")
            proc.send_signal(signal.SIGTERM)
            returncode = proc.wait(timeout=CHILD_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        stderr = err.read()
    assert returncode == 143, stderr[-3000:]
    lines = metrics_lines(out)
    rows = [json.loads(line) for line in lines]                 # every line is valid JSON
    last = rows[-1]["step"]
    assert 2 <= last < settings["MAX_STEPS"]
    assert [r["step"] for r in rows] == list(range(1, last + 1))       # no evaluation, so no step-0 row
    assert ppo.list_checkpoints(out) == [(last, checkpoint(out, last))]
    assert "Received SIGTERM" in stderr
    assert f"Interrupted by SIGTERM; checkpoint: {checkpoint(out, last)}. Run again to resume." in stderr
    assert "Traceback" not in stderr

    assert ppo.train_main([config, "--RESUME=yes"]) == 0
    assert steps_of(out) == list(range(1, settings["MAX_STEPS"] + 1))
    assert metrics_lines(out)[:last] == lines
    assert ppo.list_checkpoints(out) == [(last, checkpoint(out, last)), (5, checkpoint(out, 5))]


# -- 6. no terminal --------------------------------------------------------------------------------
def test_ask_without_terminal_resumes_latest(base, tmp_path):
    out = copy_run(base, tmp_path / "run")
    logs_before = set((out / "logs").glob("training_*.log"))
    config = write_config(tmp_path, {**base["settings"], "OUTPUT_DIR": str(out), "RESUME": "ask", "MAX_STEPS": 3,
                                     "EVAL_DATASETS": []})
    result = subprocess.run([sys.executable, str(ROOT / "ppo.py"), config], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert PROMPT not in result.stdout + result.stderr
    new_logs = set((out / "logs").glob("training_*.log")) - logs_before
    assert len(new_logs) == 1
    log = new_logs.pop().read_text(encoding="utf-8")
    assert f"Found {checkpoint(out, 2)}; no terminal to ask, so resuming from it" in log
    assert f"Resumed from {checkpoint(out, 2)}: step 2" in log
    assert steps_of(out) == [0, 1, 2, 3]


# -- 7. the y/n prompt at a real terminal ---------------------------------------------------------------
def run_at_terminal(args, cwd, answers, timeout=CHILD_TIMEOUT):
    """Run args with stdin/stdout/stderr on a pseudo-terminal; type answers[i] once the prompt has appeared
    i + 1 times. Returns (exit status, everything the child wrote, decoded with \\r\\n -> \\n)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    output, typed = b"", 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; the terminal shows:\n{output.decode('utf-8', 'replace')[-3000:]}")
            if typed < len(answers) and output.count(PROMPT.encode()) > typed:
                os.write(master, (answers[typed] + "\n").encode())
                typed += 1
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:                             # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return returncode, output.decode("utf-8", "replace").replace("\r\n", "\n"), typed


def test_prompt_at_terminal_yes_and_no(base, tmp_path):
    out = copy_run(base, tmp_path / "out")
    config = write_config(tmp_path, {**base["settings"], "OUTPUT_DIR": str(out), "RESUME": "ask", "MAX_STEPS": 3,
                                     "SAVE_EVERY_N_STEPS": 0, "EVAL_DATASETS": []})
    before = tree_digest(out)
    step_1_row = metrics_lines(out)[1]

    # "n": a new run in OUTPUT_DIR_<timestamp>; the old folder is left exactly as it was.
    returncode, screen, typed = run_at_terminal([sys.executable, str(ROOT / "ppo.py"), config], tmp_path, ["n"])
    assert returncode == 0, screen[-3000:]
    assert typed == 1
    assert "发现检查点: checkpoints/step_2" in [line.strip("\r") for line in screen.split("\n")]
    assert screen.count(PROMPT) == 1
    assert tree_digest(out) == before
    fresh = [p for p in tmp_path.iterdir() if p != out and p.name.startswith("out_")]
    assert len(fresh) == 1 and re.fullmatch(r"out_\d{8}_\d{6}", fresh[0].name), fresh
    assert steps_of(fresh[0]) == [1, 2, 3]                              # a fresh run from step 0, no eval
    assert [s for s, _ in ppo.list_checkpoints(fresh[0])] == [3]
    assert "Starting a new run in" in training_log_text(fresh[0])

    # junk, then "y": asked again, then resumed from step_2 in the same folder.
    returncode, screen, typed = run_at_terminal([sys.executable, str(ROOT / "ppo.py"), config], tmp_path,
                                                ["maybe", "y"])
    assert returncode == 0, screen[-3000:]
    assert typed == 2 and screen.count(PROMPT) == 2
    assert "发现检查点: checkpoints/step_2" in [line.strip("\r") for line in screen.split("\n")]
    assert steps_of(out) == [0, 1, 2, 3]
    assert metrics_lines(out)[1] == step_1_row
    assert [s for s, _ in ppo.list_checkpoints(out)] == [1, 2, 3]
    assert f"Resumed from {checkpoint(out, 2)}: step 2" in training_log_text(out)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("out_")]) == 1     # no second new folder


# -- 8. the guide's manual loading -----------------------------------------------------------------------
def test_guide_manual_loading_snippet(base):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    ckpt = checkpoint(base["out"], 2)
    model = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "policy")
    inputs = tokenizer("What is 3 + 4?", return_tensors="pt")
    outputs = model.generate(**inputs, max_new_tokens=8)
    response = tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert isinstance(response, str) and response.startswith("What is 3 + 4?")
    assert_same_tensors(model.state_dict(), base["policy"], "policy")
    critic = AutoModelForSequenceClassification.from_pretrained(ckpt / "critic")
    assert_same_tensors(critic.state_dict(), base["critic"], "critic")


# -- 9. bad checkpoints ----------------------------------------------------------------------------------
GUIDE_CHECKS = ("checkpoint path", "training_state.pt", "architecture")


def assert_one_clear_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, err
    for text in GUIDE_CHECKS + needles:
        assert text in errors[0], (text, errors[0])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no_training_state", "missing_folder"])
def test_bad_checkpoint_is_one_clear_error(base, tmp_path, capsys, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint(base["out"], 2), ckpt)
    state = ckpt / "training_state.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[:state.stat().st_size // 2])
    elif damage == "garbage":
        state.write_bytes(os.urandom(4096))
    elif damage == "empty":
        state.write_bytes(b"")
    elif damage == "no_training_state":
        state.unlink()
    elif damage == "missing_folder":
        shutil.rmtree(ckpt)
    config = write_config(tmp_path, {**base["settings"], "OUTPUT_DIR": str(tmp_path / "out"), "RESUME": str(ckpt)})
    capsys.readouterr()
    assert ppo.train_main([config]) == 2
    err = capsys.readouterr().err
    assert_one_clear_error(err, str(ckpt))
    if damage == "no_training_state":
        assert "missing training_state.pt" in err
    if damage == "missing_folder":
        assert "does not exist" in err


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_pickled_code_in_training_state_is_refused(base, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint(base["out"], 2), ckpt)
    marker = tmp_path / "pwned"
    torch.save({"format": 1, "state": RunsCode(f"touch {shlex.quote(str(marker))}")}, ckpt / "training_state.pt")
    config = write_config(tmp_path, {**base["settings"], "OUTPUT_DIR": str(tmp_path / "out"), "RESUME": str(ckpt)})
    capsys.readouterr()
    assert ppo.train_main([config]) == 2
    assert not marker.exists()
    assert_one_clear_error(capsys.readouterr().err, str(ckpt))
    torch.load(ckpt / "training_state.pt", weights_only=False)       # the payload is live: unsafe loading runs it
    assert marker.exists()


# -- 10. changed settings ---------------------------------------------------------------------------------
def test_resume_with_another_actor_model_is_an_error(base, tiny, tmp_path, capsys):
    ckpt = checkpoint(base["out"], 2)
    config = write_config(tmp_path, {**base["settings"], "OUTPUT_DIR": str(tmp_path / "out"), "RESUME": str(ckpt),
                                     "ACTOR_MODEL": tiny["chat_policy"]})
    capsys.readouterr()
    assert ppo.train_main([config]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "ACTOR_MODEL" in errors[0] and tiny["chat_policy"] in errors[0], err


def test_resume_with_changed_learning_rate_warns_and_uses_it(base, tmp_path):
    out = copy_run(base, tmp_path / "run")
    settings = {**base["settings"], "OUTPUT_DIR": str(out), "LEARNING_RATE": 3e-4, "MAX_STEPS": 3,
                "EVAL_DATASETS": [], "USE_LR_SCHEDULER": False}         # the rate itself, not scaled
    trainer = ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, 2)), **settings)
    log = trainer.log_path.read_text(encoding="utf-8")
    was = re.escape(repr(base["settings"].get("LEARNING_RATE", ppo.LEARNING_RATE)))
    assert re.search(rf"WARNING Resuming with a changed setting: LEARNING_RATE was {was}, now 0\.0003", log), log
    assert "CRITIC_LEARNING_RATE was" not in log and " ERROR " not in log
    trainer.train()
    assert read_rows(out)[-1]["step"] == 3 and read_rows(out)[-1]["lr/policy"] == 3e-4


# -- 11. a torn metrics line -------------------------------------------------------------------------------
def test_torn_metrics_line_is_repaired_on_resume(base, tmp_path):
    out = copy_run(base, tmp_path / "run")
    metrics = out / "logs" / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "epoch": 0.25, "objective/sc')              # a crash in the middle of a write
    with pytest.raises(json.JSONDecodeError):
        read_rows(out)
    config = write_config(tmp_path, {**base["settings"], "OUTPUT_DIR": str(out), "RESUME": "yes", "MAX_STEPS": 3,
                                     "EVAL_DATASETS": []})
    assert ppo.train_main([config]) == 0
    assert steps_of(out) == [0, 1, 2, 3]                                 # every line parses, each step once
    assert metrics.read_text(encoding="utf-8").endswith("}\n")


# -- 12. a step dropped by a signal leaves no trace ----------------------------------------------------------
class SignalWhileScoring(ppo.PPOTrainer):
    """The real trainer; a real SIGTERM reaches it while it scores the rollout of step 2."""
    calls = 0

    def compute_rewards(self, prompts, responses):
        type(self).calls += 1
        if type(self).calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().compute_rewards(prompts, responses)


def test_step_dropped_by_signal_leaves_checkpoint_of_last_completed_step(tiny, tmp_path):
    """A signal before step 2's update drops step 2 and saves step_1: that checkpoint must be the state after
    step 1 (what an uninterrupted run saves at step 1), not one that has seen step 2's rollout."""
    common = dict(REWARD_NORMALIZATION=True, EVAL_DATASETS=[], SAVE_EVERY_N_STEPS=0)
    straight = ppo.PPOTrainer(**tiny_settings(tiny, tmp_path / "a", MAX_STEPS=1, **common))
    straight.train()
    interrupted = SignalWhileScoring(**tiny_settings(tiny, tmp_path / "b", MAX_STEPS=3, **common))
    with pytest.raises(ppo.TrainingInterrupted) as info:
        interrupted.train()
    assert info.value.signum == signal.SIGTERM and info.value.checkpoint == checkpoint(tmp_path / "b", 1)
    assert ppo.list_checkpoints(tmp_path / "b") == [(1, checkpoint(tmp_path / "b", 1))]
    assert steps_of(tmp_path / "b") == [1]
    a = torch.load(checkpoint(tmp_path / "a", 1) / "training_state.pt", weights_only=True)
    b = torch.load(checkpoint(tmp_path / "b", 1) / "training_state.pt", weights_only=True)
    plan = {"lr_horizon"}                          # each run's own plan: 1 step against 3
    mismatches = {k: (a["state"][k], b["state"][k]) for k in a["state"]
                  if a["state"][k] != b["state"][k] and k not in plan}
    if not torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"]):
        mismatches["rng torch"] = "differs"
    if a["rng"][0]["python"] != b["rng"][0]["python"]:
        mismatches["rng python"] = "differs"
    assert not mismatches, f"state of the dropped step 2 leaked into step_1: {mismatches}"
