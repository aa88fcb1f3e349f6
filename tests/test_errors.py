"""Bad input and faults: one clear error (what is wrong, where, how to fix it), a non-zero exit status, no
traceback, no hang, and nothing lost in OUTPUT_DIR. Each case runs the trainer as a user does:
`ppo.train_main([run.json])` in-process, and for two cases a real `python ppo.py run.json`."""
import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import accelerate
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, llama_config, save_model, tiny_settings, word_tokenizer
from safetensors.torch import load_file, save_file

import ppo

FAST = dict(MAX_STEPS=1, GROUP_EPOCHES=1, MAX_NEW_TOKENS=6, EVAL_DATASETS=[], RESUME="no")
CHILD_TIMEOUT = 300


# -- helpers --------------------------------------------------------------------------------------
def write_config(folder: Path, settings: dict, name: str = "run.json") -> str:
    path = folder / name
    path.write_text(json.dumps(settings, indent=2))
    return str(path)


def tree_digest(folder: Path) -> dict:
    """sha256 of every file under `folder` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step_{step}"


def read_rows(out: Path):
    return [json.loads(line) for line in (Path(out) / "logs" / "metrics.jsonl").read_text().splitlines()]


def training_log_text(out: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((Path(out) / "logs").glob("training_*.log")))


def run_main(argv, capsys):
    """train_main as `python ppo.py` runs it: an exception escaping it is what the user sees as a traceback
    (Python prints it and exits with status 1), so it is turned into exactly that here."""
    capsys.readouterr()
    try:
        code = ppo.train_main(argv)
    except SystemExit as e:
        code = e.code
    except Exception:                              # noqa: BLE001 - the point is to record it as the user sees it
        sys.stderr.write(traceback.format_exc())
        code = 1
    return code, capsys.readouterr().err


def assert_words(err: str, words) -> None:
    for word in words:
        if isinstance(word, re.Pattern):
            assert word.search(err), f"no match for {word.pattern!r} in:\n{err[-3000:]}"
        else:
            assert word in err, f"{word!r} missing from:\n{err[-3000:]}"


def assert_no_traceback(err: str) -> None:
    assert "Traceback" not in err, f"a traceback reached the user:\n{err[-4000:]}"


def non_finite_tensors(folder: Path) -> list:
    """Names of saved tensors (every safetensors file, every tensor in training_state.pt) holding NaN / inf."""
    bad = []
    for file in sorted(Path(folder).rglob("*.safetensors")):
        bad += [f"{file}:{k}" for k, v in load_file(file).items()
                if v.is_floating_point() and not torch.isfinite(v).all()]
    for file in sorted(Path(folder).rglob("training_state.pt")):
        def walk(value, name):
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and not torch.isfinite(value).all():
                    bad.append(f"{file}:{name}")
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{name}.{k}")
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(v, f"{name}[{i}]")
            elif isinstance(value, float) and not math.isfinite(value):
                bad.append(f"{file}:{name}")
        walk(torch.load(file, map_location="cpu", weights_only=True), "")
    return bad


def snapshot(trainer) -> dict:
    """Every trained tensor, every optimizer state tensor, the learning rates and the schedule's position."""
    optimizer = trainer.optimizer.state_dict()
    return {"policy": {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()},
            "critic": {k: v.detach().clone() for k, v in trainer.critic.state_dict().items()},
            "optimizer": {f"{i}.{k}": v.detach().clone() for i, s in optimizer["state"].items() for k, v in s.items()
                          if isinstance(v, torch.Tensor)},
            "lr": [group["lr"] for group in trainer.optimizer.param_groups],
            "optimizer_steps": trainer.state.optimizer_steps}


def differences(before: dict, after: dict) -> list:
    changed = [k for k in ("lr", "optimizer_steps") if before[k] != after[k]]
    for part in ("policy", "critic", "optimizer"):
        if before[part].keys() != after[part].keys():
            changed.append(f"{part}: keys")
            continue
        changed += [f"{part}.{k}" for k in before[part] if not torch.equal(before[part][k], after[part][k])]
    return changed


@pytest.fixture(scope="module")
def existing_run(tiny, tmp_path_factory):
    """A finished 1-step tiny run with checkpoints/step_1: the user's work that no failure may damage. Each
    test copies it into its own OUTPUT_DIR."""
    out = tmp_path_factory.mktemp("existing") / "run"
    settings = tiny_settings(tiny, out, **FAST)
    assert ppo.PPOTrainer(**settings).train() == "max_steps"
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1))]
    return {"out": out, "settings": settings}


def copy_run(existing_run, dest: Path) -> Path:
    shutil.copytree(existing_run["out"], dest)
    return dest


@pytest.fixture
def weight_loads(monkeypatch):
    """Class names of the models whose weights were loaded (any from_pretrained of a transformers model)."""
    from transformers import PreTrainedModel
    loads = []
    real = PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        loads.append(cls.__name__)
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    return loads


# -- the cases -------------------------------------------------------------------------------------
# Each builds its files under `tmp`, edits the run's settings `s` and returns what the user must see:
# exit status, words of the message, and optionally a raw config text / extra flags. `early` (default True): the
# error is known before any model weights need loading, so none may be loaded first. `mp`: monkeypatch.
def dataset(path, kind="jsonl", input="problem", output="solution"):
    return {"path": str(path), "type": kind, "input": input, "output": output}


def jsonl(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


GOOD = [{"problem": f"What is {i} + 1?", "solution": f"The answer is {i + 1}."} for i in range(4)]


def case_missing_file(tiny, tmp, s, mp):
    s["TRAIN_DATASETS"] = [dataset(tmp / "nope.jsonl")]
    return dict(code=2, words=["TRAIN_DATASETS[0]", "nope.jsonl", "not found"])


def case_malformed_jsonl_line(tiny, tmp, s, mp):
    (tmp / "bad.jsonl").write_text(jsonl(GOOD[:2] + ['{"problem": "What is 2 + 2?" "solution": "4"}'] + GOOD[2:]))
    s["TRAIN_DATASETS"] = [dataset(tmp / "bad.jsonl")]
    return dict(code=2, words=["TRAIN_DATASETS[0]", "bad.jsonl", "line 3", "column 30", "one JSON object"])


def case_truncated_jsonl_line(tiny, tmp, s, mp):
    """A line cut short (a crash while the file was written): the error is at the end of line 3."""
    (tmp / "cut.jsonl").write_text(jsonl(GOOD[:2] + ['{"problem": "What is 2 + 2?", "solution": '] + GOOD[2:]))
    s["TRAIN_DATASETS"] = [dataset(tmp / "cut.jsonl")]
    return dict(code=2, words=["cut.jsonl", "line 3, column 43", "invalid JSON"])


def case_line_not_an_object(tiny, tmp, s, mp):
    (tmp / "list.jsonl").write_text(jsonl(GOOD[:2] + ['["What is 2 + 2?", "4"]'] + GOOD[2:]))
    s["TRAIN_DATASETS"] = [dataset(tmp / "list.jsonl")]
    return dict(code=2, words=["list.jsonl", "line 3", "JSON object"])


def case_missing_input_column(tiny, tmp, s, mp):
    s["TRAIN_DATASETS"] = [dataset(tiny["train"], input="prompt")]
    return dict(code=2, words=["TRAIN_DATASETS[0]", "'prompt'", "\"input\"", "['problem', 'solution']"])


def case_missing_output_column(tiny, tmp, s, mp):
    s["EVAL_DATASETS"] = [dataset(tiny["eval_parquet"], "parquet", input="question", output="solution")]
    return dict(code=2, words=["EVAL_DATASETS[0]", "'solution'", "\"output\"", "eval.parquet",
                               "['question', 'answer']"])


def case_empty_file(tiny, tmp, s, mp):
    (tmp / "empty.jsonl").write_text("")
    s["TRAIN_DATASETS"] = [dataset(tmp / "empty.jsonl")]
    return dict(code=2, words=["TRAIN_DATASETS[0]", "empty.jsonl", "is empty"])


def case_blank_lines_only(tiny, tmp, s, mp):
    (tmp / "blank.jsonl").write_text("\n\n  \n")
    s["TRAIN_DATASETS"] = [dataset(tmp / "blank.jsonl")]
    return dict(code=2, words=["TRAIN_DATASETS", "blank.jsonl", re.compile(r"no usable rows|no rows|is empty")])


def case_parquet_without_rows(tiny, tmp, s, mp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "solution": pa.array([], pa.string())}),
                   tmp / "none.parquet")
    s["TRAIN_DATASETS"] = [dataset(tmp / "none.parquet", "parquet")]
    return dict(code=2, words=["TRAIN_DATASETS", "none.parquet", "no usable rows"])


def case_null_prompt(tiny, tmp, s, mp):
    (tmp / "null.jsonl").write_text(jsonl(GOOD[:2] + [{"problem": None, "solution": "4"}] + GOOD[2:]))
    s["TRAIN_DATASETS"] = [dataset(tmp / "null.jsonl")]
    return dict(code=2, words=["TRAIN_DATASETS[0]", "null.jsonl", "line 3", "'problem'", "None",
                               "non-empty string"])


def case_number_prompt(tiny, tmp, s, mp):
    (tmp / "number.jsonl").write_text(jsonl(GOOD[:2] + [{"problem": 5, "solution": "4"}] + GOOD[2:]))
    s["TRAIN_DATASETS"] = [dataset(tmp / "number.jsonl")]
    return dict(code=2, words=["number.jsonl", "line 3", "'problem'", "holds 5", "non-empty string"])


def case_number_prompt_after_blank_line(tiny, tmp, s, mp):
    (tmp / "number.jsonl").write_text("\n" + jsonl(GOOD[:1] + [{"problem": 5, "solution": "4"}] + GOOD[1:]))
    s["TRAIN_DATASETS"] = [dataset(tmp / "number.jsonl")]           # a blank first line: the row is on line 3
    return dict(code=2, words=["number.jsonl", "line 3", "'problem'", "holds 5", "non-empty string"])


def case_null_prompt_in_parquet(tiny, tmp, s, mp):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"q": ["What is 1 + 1?", None, "What is 3 + 3?"], "a": ["2", "4", "6"]}),
                   tmp / "holes.parquet")
    s["TRAIN_DATASETS"] = [dataset(tmp / "holes.parquet", "parquet", input="q", output="a")]
    return dict(code=2, words=["holes.parquet", "row 2", "'q'", "None", "non-empty string"])


def case_unsupported_type(tiny, tmp, s, mp):
    (tmp / "data.csv").write_text("problem,solution\nWhat is 1 + 1?,2\n")
    s["TRAIN_DATASETS"] = [dataset(tmp / "data.csv", "csv")]
    return dict(code=2, words=["TRAIN_DATASETS[0]", "'csv'", "not supported", '"jsonl" or "parquet"'])


def case_corrupt_parquet(tiny, tmp, s, mp):
    (tmp / "broken.parquet").write_bytes(os.urandom(2048))
    s["EVAL_DATASETS"] = [dataset(tmp / "broken.parquet", "parquet", input="question", output="answer")]
    return dict(code=2, words=["EVAL_DATASETS[0]", "broken.parquet", "not a readable Parquet file"])


def case_actor_model_missing(tiny, tmp, s, mp):
    s["ACTOR_MODEL"] = str(tmp / "no_such_model")
    return dict(code=2, words=["ACTOR_MODEL", "no_such_model", "no such folder"])


def case_actor_model_missing_relative(tiny, tmp, s, mp):
    """A relative path with a typo looks like a hub id ("org/name"): with no network it must still be one
    clear error naming the constant, quickly."""
    import huggingface_hub.constants
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)     # no 45 s of retries on a machine without network
    mp.setenv("HF_HUB_OFFLINE", "1")
    s["ACTOR_MODEL"] = "models/tiny-polcy"
    return dict(code=2, words=["ACTOR_MODEL", "models/tiny-polcy"])


def case_policy_is_a_reward_model(tiny, tmp, s, mp):
    s["ACTOR_MODEL"] = tiny["reward"]
    return dict(code=2, words=["ACTOR_MODEL", tiny["reward"], "ForSequenceClassification",
                               "not a causal language model", "AutoModelForCausalLM"])


def case_reward_model_is_a_causal_lm(tiny, tmp, s, mp):
    s["REWARD_MODEL"] = tiny["policy"]
    return dict(code=2, words=["REWARD_MODEL", tiny["policy"], "LlamaForCausalLM", "sequence-classification",
                               "AutoModelForSequenceClassification", "num_labels=1"])


def case_reward_model_two_labels(tiny, tmp, s, mp):
    from transformers import LlamaForSequenceClassification
    tok = word_tokenizer("right", append_eos=True)
    path = save_model(LlamaForSequenceClassification(llama_config(len(tok), num_labels=2)), tok, tmp / "rm2")
    s["REWARD_MODEL"] = path
    return dict(code=2, words=["REWARD_MODEL", "rm2", "num_labels = 2", "num_labels=1"])


def case_critic_model_missing(tiny, tmp, s, mp):
    s["CRITIC_MODEL"] = str(tmp / "no_such_critic")
    return dict(code=2, words=["CRITIC_MODEL", "no_such_critic", "no such folder"])


def case_critic_vocabulary_smaller(tiny, tmp, s, mp):
    """The critic reads the policy's token ids: a critic with a smaller vocabulary cannot embed them."""
    from transformers import LlamaForSequenceClassification
    tok = word_tokenizer("right", append_eos=True)
    s["CRITIC_MODEL"] = save_model(LlamaForSequenceClassification(llama_config(8, num_labels=1)), tok, tmp / "small")
    return dict(code=2, words=["CRITIC_MODEL", "small", re.compile(r"vocab", re.I)])


def case_stop_token_not_a_token(tiny, tmp, s, mp):
    s["STOP_TOKENS"] = ["<|im_end|>"]
    return dict(code=2, words=["STOP_TOKENS", "'<|im_end|>'", "not a single token"])


def case_early_stopping_metric_unknown(tiny, tmp, s, mp):
    s.update(EVAL_DATASETS=[dataset(tiny["eval_parquet"], "parquet", input="question", output="answer")],
             MAX_EVAL_SAMPLES=2, EARLY_STOPPING_PATIENCE=1, EARLY_STOPPING_METRIC="eval/acc")
    return dict(code=2, early=False, words=["EARLY_STOPPING_METRIC = 'eval/acc'", "eval/accuracy"])


def case_dataset_entry_without_input(tiny, tmp, s, mp):
    s["TRAIN_DATASETS"] = [{"path": tiny["train"], "type": "jsonl", "output": "solution"}]
    return dict(code=2, words=["TRAIN_DATASETS[0]", '"input": "problem"'])


def case_config_not_an_object(tiny, tmp, s, mp):
    return dict(code=2, config_text=json.dumps([s]), words=["run.json", "one object"])


def case_unknown_constant(tiny, tmp, s, mp):
    s["LEARNING_RAT"] = 1e-5
    return dict(code=2, words=["run.json", "'LEARNING_RAT'", "Did you mean LEARNING_RATE?"])


def case_unknown_flag(tiny, tmp, s, mp):
    return dict(code=2, flags=["--GROUP_EPOCHS=2"], words=["--GROUP_EPOCHS=2", "Did you mean GROUP_EPOCHES?"])


def case_wrong_type(tiny, tmp, s, mp):
    s["BATCH_SIZE"] = "4"
    return dict(code=2, words=["BATCH_SIZE", "run.json", "must be a int", "'4' (str)"])


def case_invalid_json_config(tiny, tmp, s, mp):
    text = json.dumps(s, indent=2).replace('"BATCH_SIZE": 4,', '"BATCH_SIZE": 4,,', 1)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "BATCH_SIZE" in t)
    column = text.splitlines()[line - 1].index(",,") + 2
    return dict(code=2, config_text=text, words=["run.json", f"line {line}, column {column}", "invalid JSON"])


def case_negative_learning_rate(tiny, tmp, s, mp):
    s["LEARNING_RATE"] = -1e-5
    return dict(code=2, words=["LEARNING_RATE = -1e-05", "must be > 0"])


def case_zero_clip_range(tiny, tmp, s, mp):
    s["CLIP_RANGE"] = 0.0
    return dict(code=2, words=["CLIP_RANGE = 0.0", "must be > 0"])


def case_zero_group_size(tiny, tmp, s, mp):
    s["GROUP_SIZE"] = 0
    return dict(code=2, words=["GROUP_SIZE = 0", "must be > 0"])


def case_grpo_with_one_response(tiny, tmp, s, mp):
    s.update(ADVANTAGE_ESTIMATOR="grpo", GROUP_SIZE=1)
    return dict(code=2, words=["ADVANTAGE_ESTIMATOR", "GROUP_SIZE >= 2"])


def case_bad_choice(tiny, tmp, s, mp):
    s["LR_SCHEDULER_TYPE"] = "step"
    return dict(code=2, words=["LR_SCHEDULER_TYPE = 'step'", "'cosine'", "'plateau'"])


def case_output_dir_is_under_a_file(tiny, tmp, s, mp):
    """A path no one can write to, root included: its parent is a regular file."""
    (tmp / "blocker").write_text("not a folder")
    s["OUTPUT_DIR"] = str(tmp / "blocker" / "run")
    return dict(code=2, keep_output=False, words=["OUTPUT_DIR", str(tmp / "blocker" / "run"), "not writable"])


def case_out_of_memory(tiny, tmp, s, mp):
    def ppo_update(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    mp.setattr(ppo.PPOTrainer, "ppo_update", ppo_update)
    return dict(code=1, early=False, words=["out of memory", "BATCH_SIZE", "GRADIENT_ACCUMULATION_STEPS",
                                            "GROUP_SIZE = 1", "MAX_NEW_TOKENS"])


class WrongScoreCount(ppo.PPOTrainer):
    def compute_rewards(self, prompts, responses):
        return super().compute_rewards(prompts, responses)[:-1]


def case_wrong_number_of_scores(tiny, tmp, s, mp):
    mp.setattr(ppo, "PPOTrainer", WrongScoreCount)
    return dict(code=1, early=False, words=["compute_rewards", "one score per response"])


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_error(name, tiny, tmp_path, capsys, monkeypatch, existing_run, weight_loads):
    out = copy_run(existing_run, tmp_path / "out")
    before = tree_digest(out / "checkpoints")
    settings = tiny_settings(tiny, out, **FAST)
    case = CASES[name](tiny, tmp_path, settings, monkeypatch)
    config = tmp_path / "run.json"
    config.write_text(case.get("config_text") or json.dumps(settings, indent=2))

    code, err = run_main([str(config)] + case.get("flags", []), capsys)

    assert_no_traceback(err)
    assert code == case["code"], err[-3000:]
    assert_words(err, case["words"])
    assert tree_digest(out / "checkpoints") == before, "the checkpoint already in OUTPUT_DIR changed"
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1))]
    if case.get("early", True):
        assert weight_loads == [], f"model weights were loaded before the error was reported: {weight_loads}"


@pytest.mark.parametrize("name", ["malformed_jsonl_line", "reward_model_is_a_causal_lm"])
def test_python_ppo_py_reports_bad_input(name, tiny, tmp_path, monkeypatch, existing_run):
    """The same errors from a real `python ppo.py run.json`, run from another folder with no terminal."""
    out = copy_run(existing_run, tmp_path / "out")
    before = tree_digest(out / "checkpoints")
    settings = tiny_settings(tiny, out, **FAST)
    case = CASES[name](tiny, tmp_path, settings, monkeypatch)
    config = write_config(tmp_path, settings)
    result = subprocess.run([sys.executable, str(ROOT / "ppo.py"), config], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert_no_traceback(result.stderr)
    assert result.returncode == case["code"], result.stderr[-3000:]
    assert_words(result.stderr, case["words"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert tree_digest(out / "checkpoints") == before


# -- OUTPUT_DIR that cannot be written ------------------------------------------------------------------
def test_read_only_output_dir(tiny, tmp_path, capsys, existing_run):
    """A read-only OUTPUT_DIR holding an earlier run. chmod does not stop root (the tests may run as root):
    then the case of OUTPUT_DIR under a regular file (above) is the one that applies."""
    out = copy_run(existing_run, tmp_path / "out")
    before = tree_digest(out / "checkpoints")
    folders = [out] + [p for p in out.rglob("*") if p.is_dir()]
    for folder in folders:
        folder.chmod(0o500)
    try:
        if os.access(out, os.W_OK) or os.geteuid() == 0:
            pytest.skip("running as root: chmod does not stop writes (see case output_dir_is_under_a_file)")
        code, err = run_main([write_config(tmp_path, tiny_settings(tiny, out, **FAST))], capsys)
    finally:
        for folder in folders:
            folder.chmod(0o700)
    assert_no_traceback(err)
    assert code == 2, err[-3000:]
    assert_words(err, ["OUTPUT_DIR", str(out), "not writable"])
    assert tree_digest(out / "checkpoints") == before


# -- RESUME = "no" where a run already is --------------------------------------------------------------------
def test_fresh_run_in_a_used_output_dir_loses_nothing(tiny, tmp_path, capsys, monkeypatch, existing_run):
    """RESUME = "no" (the setting of every case above) in an OUTPUT_DIR holding a run: the earlier run's files
    stay as they were, and the new run's own result is not silently dropped. Either outcome is fine: an exit-2
    error naming OUTPUT_DIR / RESUME, or a run whose final weights are saved somewhere (e.g. a new folder, as
    the y/n prompt's "n" does)."""
    out = copy_run(existing_run, tmp_path / "out")
    old = {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
           for name in ("training_config.json", "logs/metrics.jsonl")}
    old_checkpoints = tree_digest(out / "checkpoints")
    cls = use_trainer(monkeypatch, Recording)
    settings = tiny_settings(tiny, out, **{**FAST, "SEED": 7})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    assert_no_traceback(err)
    assert code in (0, 2), err[-3000:]
    assert tree_digest(out / "checkpoints") == old_checkpoints, "the earlier run's checkpoint changed"
    for name, digest in old.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, f"the earlier run's {name} changed"
    if code == 2:
        assert_words(err, ["OUTPUT_DIR", "RESUME"])
        return
    final = {k: v.contiguous() for k, v in cls.instances[-1].policy.state_dict().items()}
    saved = [f for f in tmp_path.rglob("model.safetensors") if f.parent.name == "policy" and
             all(torch.equal(v, final[k]) for k, v in load_file(f).items())]
    assert saved, "the new run finished (exit 0) but its final policy is in no checkpoint"


# -- the disk fills up during a save -----------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("part", ["training_state", "weights"])
def test_disk_full_during_save_keeps_previous_checkpoint(part, tiny, tmp_path, capsys, monkeypatch, existing_run):
    """Resume the existing run for one more step; its save (step_2) fails with ENOSPC."""
    out = copy_run(existing_run, tmp_path / "out")
    before = tree_digest(out / "checkpoints")
    if part == "training_state":
        monkeypatch.setattr(ppo.torch, "save", no_space)
    else:
        import transformers.modeling_utils
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    settings = tiny_settings(tiny, out, **{**FAST, "MAX_STEPS": 2, "SAVE_EVERY_N_STEPS": 1, "RESUME": "yes"})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    monkeypatch.undo()

    after = {k: v for k, v in tree_digest(out / "checkpoints").items() if not k.startswith(".tmp_step_2/")}
    assert after == before, "the previous checkpoint changed"              # (a hidden partial .tmp_step_2 aside)
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1))]
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step_1"]
    resumed = ppo.PPOTrainer(resume_from_checkpoint=str(checkpoint(out, 1)), **settings)   # still loadable
    assert resumed.state.global_step == 1
    assert_no_traceback(err)
    assert code == 1, err[-3000:]
    assert_words(err, [re.compile(r"No space left on device|disk is full|disk full", re.I),
                       str(out / "checkpoints")])


# -- NaN / inf ----------------------------------------------------------------------------------------
class Recording(ppo.PPOTrainer):
    """The real trainer; remembers its instances and a snapshot before and after every PPO step."""
    instances: list = []

    def __init__(self, *args, **kwargs):
        type(self).instances.append(self)
        self.steps = []
        super().__init__(*args, **kwargs)

    def train_step(self, prompts):
        before = snapshot(self)
        metrics = super().train_step(prompts)
        self.steps.append((before, snapshot(self), metrics))
        return metrics


class BadRewards(Recording):
    """compute_rewards gives `bad` for one response in the rollouts numbered `bad_calls` (1-based)."""
    bad_calls = ()
    bad = float("nan")

    def compute_rewards(self, prompts, responses):
        self.reward_calls = getattr(self, "reward_calls", 0) + 1
        scores = super().compute_rewards(prompts, responses).clone()
        if self.reward_calls in self.bad_calls:
            scores[1] = self.bad
        return scores


def use_trainer(monkeypatch, cls, **attributes):
    trainer_class = type(cls.__name__, (cls,), {"instances": [], **attributes})
    monkeypatch.setattr(ppo, "PPOTrainer", trainer_class)
    return trainer_class


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_reward_skips_the_step_untouched(bad, tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    cls = use_trainer(monkeypatch, BadRewards, bad_calls=(2,), bad=bad)
    settings = tiny_settings(tiny, out, **{**FAST, "MAX_STEPS": 3, "GROUP_EPOCHES": 2, "SAVE_EVERY_N_STEPS": 1,
                                           "USE_LR_SCHEDULER": True, "WARMUP_STEPS": 20, "ADAPTIVE_KL": True})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    assert_no_traceback(err)
    assert code == 0, err[-3000:]
    trainer = cls.instances[-1]
    assert math.isfinite(trainer.state.kl_coef), "a skipped step fed its NaN KL to the KL controller"
    assert len(trainer.steps) == 3
    (b1, a1, m1), (b2, a2, m2), (b3, a3, m3) = trainer.steps
    assert differences(b2, a2) == [], "the skipped step changed weights, optimizer state or the lr schedule"
    for before, after in ((b1, a1), (b3, a3)):                          # the other steps do train
        changed = differences(before, after)
        assert "lr" in changed and "optimizer_steps" in changed and any(c.startswith("policy.") for c in changed)
    assert a3["optimizer_steps"] == 2 * settings["GROUP_EPOCHES"]
    assert [m["ppo/skipped_optimizer_steps"] for m in (m1, m2, m3)] == [0, settings["GROUP_EPOCHES"], 0]
    assert trainer.state.consecutive_skips == 0
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["ppo/skipped_optimizer_steps"] for r in rows] == [0, settings["GROUP_EPOCHES"], 0]
    assert "step 2: NaN / inf in the scores" in err and "skipped" in err
    assert "step 2: NaN / inf in the scores" in training_log_text(out)
    assert ppo.list_checkpoints(out) == [(s, checkpoint(out, s)) for s in (1, 2, 3)]
    assert torch.load(checkpoint(out, 3) / "training_state.pt", weights_only=True)["state"]["consecutive_skips"] == 0
    assert non_finite_tensors(out / "checkpoints") == []


def test_repeated_non_finite_rewards_stop_the_run(tiny, tmp_path, capsys, monkeypatch, existing_run):
    """Resume the existing run: step 2 is good, then every reward is NaN; MAX_CONSECUTIVE_SKIPS = 2 stops the
    run during step 4 with exit 1, and every checkpoint (old and new) is intact."""
    out = copy_run(existing_run, tmp_path / "out")
    before = tree_digest(checkpoint(out, 1))
    cls = use_trainer(monkeypatch, BadRewards, bad_calls=range(2, 100))
    settings = tiny_settings(tiny, out, **{**FAST, "MAX_STEPS": 6, "SAVE_EVERY_N_STEPS": 1, "RESUME": "yes",
                                           "MAX_CONSECUTIVE_SKIPS": 2})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    assert_no_traceback(err)
    assert code == 1, err[-3000:]
    assert_words(err, ["2 steps in a row", "NaN / inf", "MAX_CONSECUTIVE_SKIPS = 2", "LEARNING_RATE",
                       "MAX_GRAD_NORM"])
    trainer = cls.instances[-1]
    assert trainer.state.consecutive_skips == 2
    assert tree_digest(checkpoint(out, 1)) == before
    assert ppo.list_checkpoints(out) == [(s, checkpoint(out, s)) for s in (1, 2, 3)]
    for part in ("policy", "critic"):        # step 3 was skipped: its checkpoint holds step 2's weights exactly
        a = load_file(checkpoint(out, 2) / part / "model.safetensors")
        b = load_file(checkpoint(out, 3) / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert non_finite_tensors(out / "checkpoints") == []
    latest = ppo.choose_resume(ppo.make_config({**settings, "RESUME": "yes"}))[0]
    assert latest == str(checkpoint(out, 3))
    assert ppo.load_checkpoint_state(Path(latest), ppo.make_config(settings))["state"]["global_step"] == 3


class NaNGradient(Recording):
    """Puts a NaN into one policy gradient before the optimizer step numbered `poison_call` (1-based)."""
    poison_call = 2

    def optimizer_step(self):
        self.optimizer_calls = getattr(self, "optimizer_calls", 0) + 1
        if self.optimizer_calls != self.poison_call:
            return super().optimizer_step()
        param = next(p for p in self.policy.parameters() if p.grad is not None)
        param.grad.view(-1)[0] = float("nan")
        before = snapshot(self)
        norms, stepped = super().optimizer_step()
        self.poisoned = (before, snapshot(self), stepped, norms)
        return norms, stepped


def test_nan_gradient_skips_that_optimizer_step(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    cls = use_trainer(monkeypatch, NaNGradient)
    settings = tiny_settings(tiny, out, **{**FAST, "MAX_STEPS": 2, "GROUP_EPOCHES": 2, "SAVE_EVERY_N_STEPS": 1,
                                           "USE_LR_SCHEDULER": True, "WARMUP_STEPS": 20, "ADAPTIVE_KL": True})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    assert_no_traceback(err)
    assert code == 0, err[-3000:]
    trainer = cls.instances[-1]
    assert math.isfinite(trainer.state.kl_coef), "a skipped step fed its NaN KL to the KL controller"
    before, after, stepped, norms = trainer.poisoned
    assert not stepped and not torch.isfinite(norms[0])
    assert before["optimizer"], "the poisoned step should come after an optimizer step that made Adam state"
    assert differences(before, after) == [], "a NaN gradient changed weights, optimizer state or the lr schedule"
    assert trainer.state.optimizer_steps == 3                           # 4 optimizer steps, one skipped
    assert [m["ppo/skipped_optimizer_steps"] for _, _, m in trainer.steps] == [1, 0]
    assert trainer.state.consecutive_skips == 0
    assert [r["ppo/skipped_optimizer_steps"] for r in read_rows(out)] == [1, 0]
    assert "step 1: non-finite gradient" in err and "optimizer step skipped" in err
    for name, value in trainer.policy.state_dict().items():
        assert torch.isfinite(value).all(), name
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1)), (2, checkpoint(out, 2))]
    assert non_finite_tensors(out / "checkpoints") == []
    probe = tmp_path / "probe"                                          # the scan does see a NaN
    probe.mkdir()
    save_file({"w": torch.tensor([1.0, float("nan")])}, probe / "model.safetensors")
    torch.save({"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}, "state": {}},
               probe / "training_state.pt")
    assert len(non_finite_tensors(probe)) == 2


REAL_ACCELERATOR = accelerate.Accelerator


def accelerator_with_cpu_grad_scaler(*args, **kwargs):
    """fp16 on a GPU trains under accelerate's GradScaler, and accelerate makes none on CPU. This Accelerator
    gets torch's own CPU GradScaler; prepare() hands it to the optimizer wrapper as it does on a GPU."""
    accelerator = REAL_ACCELERATOR(*args, **kwargs)
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=1024.0)
    return accelerator


def test_fp16_overflow_lowers_the_loss_scale_and_a_resume_keeps_it(tiny, tmp_path, capsys, monkeypatch,
                                                                   fresh_accelerator_state):
    """A skipped fp16 step must back off the loss scale, or the next unscale raises (the scaler was never
    updated) and every later step overflows again. The lowered scale travels in the checkpoint."""
    monkeypatch.setattr(accelerate, "Accelerator", accelerator_with_cpu_grad_scaler)
    plain = ppo.PPOTrainer
    out = tmp_path / "out"
    cls = use_trainer(monkeypatch, NaNGradient)                 # NaN at optimizer step 2 of 4 (PPO step 1)
    settings = tiny_settings(tiny, out, **{**FAST, "MAX_STEPS": 2, "GROUP_EPOCHES": 2, "SAVE_EVERY_N_STEPS": 1,
                                           "MIXED_PRECISION": "fp16"})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    assert_no_traceback(err)
    assert code == 0, err[-3000:]
    trainer = cls.instances[-1]
    assert trainer.optimizer.scaler is trainer.accelerator.scaler
    assert trainer.state.optimizer_steps == 3
    assert trainer.accelerator.scaler.get_scale() == 512.0      # halved once; growth needs 2000 clean steps
    assert "optimizer step skipped, weights unchanged; fp16 loss scale lowered to 512." in err
    assert non_finite_tensors(out / "checkpoints") == []
    resumed = plain(resume_from_checkpoint=str(checkpoint(out, 1)), **{**settings, "MAX_STEPS": 3})
    assert resumed.accelerator.scaler.get_scale() == 512.0      # not the fresh scaler's 1024
    resumed.accelerator.end_training()


# -- handled without an error ------------------------------------------------------------------------------
@pytest.mark.parametrize("constant", ["ACTOR_MODEL", "REWARD_MODEL"])
def test_tokenizer_without_pad_token_trains(constant, tiny, tmp_path, capsys):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    source = tiny["policy"] if constant == "ACTOR_MODEL" else tiny["reward"]
    folder = tmp_path / "no_pad"
    shutil.copytree(source, folder)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    tok.pad_token = None
    tok.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None, "the test model must lack a pad token"
    out = tmp_path / "out"
    settings = tiny_settings(tiny, out, **{**FAST, constant: str(folder)})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    assert_no_traceback(err)
    assert code == 0, err[-3000:]
    notes = [line for line in err.splitlines() if "has no pad token" in line]
    assert len(notes) == 1 and f"{constant}: the tokenizer has no pad token; padding with '<unk>'" in notes[0], notes
    assert " INFO " in notes[0]
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [1] and math.isfinite(rows[0]["objective/rm_score"])
    assert ppo.list_checkpoints(out) == [(1, checkpoint(out, 1))]


def test_reward_model_with_another_vocabulary_trains(tiny, tmp_path, capsys):
    """tiny["other_reward"]: another architecture and another token order; it reads decoded text."""
    out = tmp_path / "out"
    settings = tiny_settings(tiny, out, **{**FAST, "MAX_STEPS": 2, "REWARD_MODEL": tiny["other_reward"]})
    code, err = run_main([write_config(tmp_path, settings)], capsys)
    assert_no_traceback(err)
    assert code == 0, err[-3000:]
    rows = read_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["objective/rm_score"]) and r["ppo/skipped_optimizer_steps"] == 0 for r in rows)
    assert ppo.list_checkpoints(out) == [(2, checkpoint(out, 2))]


def test_large_learning_rate_for_a_large_policy_warns(make_trainer, capsys):
    """check_learning_rate on a 0.4B-parameter module (meta tensors: no memory)."""
    trainer = make_trainer(**FAST)
    big = nn.Linear(20_000, 20_000, device="meta")
    assert sum(p.numel() for p in big.parameters()) >= 0.3e9
    capsys.readouterr()
    ppo.check_learning_rate(big, trainer.cfg)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "LEARNING_RATE" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], err
    assert_words(warnings[0], [f"LEARNING_RATE = {ppo.LEARNING_RATE!r}", "1e-6 to 5e-6", "0.4B"])
    assert "1e-6 to 5e-6" in trainer.log_path.read_text(encoding="utf-8")

    ppo.check_learning_rate(nn.Linear(8, 8), trainer.cfg)                     # a small policy: 1e-4 is fine
    trainer.cfg["LEARNING_RATE"] = 2e-6                                 # the usual range: no warning
    ppo.check_learning_rate(big, trainer.cfg)
    trainer.cfg.update(LEARNING_RATE=1e-4, USE_LORA=True)              # LoRA adapters take larger rates
    ppo.check_learning_rate(big, trainer.cfg)
    assert "LEARNING_RATE" not in capsys.readouterr().err
