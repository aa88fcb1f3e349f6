"""Settings: constants < JSON/YAML file < --NAME=value flags; clear errors; importing ppo has no side effects."""
import json
import subprocess
import sys

import pytest

import ppo
from conftest import ROOT


def test_flags_override_file_override_constants(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"BATCH_SIZE": 3, "LEARNING_RATE": 2e-5, "OUTPUT_DIR": "from_file"}))
    cfg = ppo.parse_args([str(run), "--OUTPUT_DIR=from_flag", "--USE_WANDB=true", "--WANDB_ENTITY=None"])
    assert cfg.BATCH_SIZE == 3 and cfg.LEARNING_RATE == 2e-5
    assert cfg.OUTPUT_DIR == "from_flag" and cfg.USE_WANDB is True and cfg.WANDB_ENTITY is None
    assert cfg.GROUP_EPOCHES == ppo.GROUP_EPOCHES


def test_yaml_file_and_value_types(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("KL_COEF: 1\nSTOP_TOKENS: ['<|im_end|>']\nTRAIN_DATASETS:\n  - {path: a.jsonl, type: jsonl, input: q}\n")
    cfg = ppo.parse_args([str(run), "--CLIP_RANGE=1", "--USE_LR_SCHEDULER=False"])
    assert cfg.KL_COEF == 1.0 and isinstance(cfg.KL_COEF, float)        # an int may stand for a float
    assert cfg.CLIP_RANGE == 1.0 and isinstance(cfg.CLIP_RANGE, float)
    assert cfg.STOP_TOKENS == ["<|im_end|>"] and cfg.TRAIN_DATASETS[0]["input"] == "q"
    assert cfg.USE_LR_SCHEDULER is False


def test_constants_edited_in_the_module_are_the_defaults(monkeypatch):
    monkeypatch.setattr(ppo, "BATCH_SIZE", 7)
    assert ppo.parse_args([]).BATCH_SIZE == 7


@pytest.mark.parametrize("argv, words", [
    (["--BATCH_SIZ=2"], ["Unknown setting", "BATCH_SIZE"]),
    (["--LEARNING_RATE=fast"], ["LEARNING_RATE", "float"]),
    (["--BATCH_SIZE=2.5"], ["BATCH_SIZE", "int"]),
    (["--USE_WANDB=1"], ["USE_WANDB", "bool"]),
    (["--BATCH_SIZE"], ["needs a value"]),
    (["missing.json"], ["missing.json", "does not exist"]),
])
def test_bad_settings_name_the_problem(argv, words):
    with pytest.raises(ppo.ConfigError) as error:
        ppo.parse_args(argv)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_invalid_json_file_gives_line_and_column(tmp_path):
    run = tmp_path / "run.json"
    run.write_text('{\n  "BATCH_SIZE": 2,\n  "KL_COEF": ,\n}')
    with pytest.raises(ppo.ConfigError, match=r"run.json, line 3, column 14"):
        ppo.parse_args([str(run)])


@pytest.mark.parametrize("override, words", [
    ({"LEARNING_RATE": -1e-6}, ["LEARNING_RATE", "> 0"]),
    ({"CLIP_RANGE": 0.0}, ["CLIP_RANGE", "> 0"]),
    ({"GROUP_SIZE": 0}, ["GROUP_SIZE", "> 0"]),
    ({"LR_SCHEDULER_TYPE": "step"}, ["LR_SCHEDULER_TYPE", "cosine"]),
    ({"KL_ESTIMATOR": "k4"}, ["KL_ESTIMATOR", "k1", "k2", "k3"]),
    ({"LOSS_AGGREGATION": "sum"}, ["LOSS_AGGREGATION", "seq-mean-token-sum-norm"]),
    ({"POLICY_LOSS": "grpo"}, ["POLICY_LOSS", "gspo", "cispo"]),
    ({"POLICY_LOSS": "gspo", "LOSS_AGGREGATION": "seq-mean-token-mean"},
     ["gspo", "ADVANTAGE_ESTIMATOR = 'gae'", "one per token"]),
    ({"POLICY_LOSS": "gspo", "ADVANTAGE_ESTIMATOR": "reinforce++",
      "LOSS_AGGREGATION": "seq-mean-token-mean"}, ["gspo", "'reinforce++'"]),
    ({"POLICY_LOSS": "gspo", "ADVANTAGE_ESTIMATOR": "grpo"},
     ["gspo", "LOSS_AGGREGATION = 'seq-mean-token-mean'", "'token-mean'"]),
    ({"ADVANTAGE_ESTIMATOR": "dr_grpo", "GROUP_SIZE": 1}, ["dr_grpo", "GROUP_SIZE >= 2"]),
    ({"DUAL_CLIP": 0.5}, ["DUAL_CLIP", "> 1"]),
    ({"POLICY_LOSS": "cispo", "DUAL_CLIP": 3.0}, ["cispo", "DUAL_CLIP = 0"]),
    ({"CLIP_RANGE_HIGH": -0.1}, ["CLIP_RANGE_HIGH", "> 0", "None"]),
    ({"CLIP_RANGE_LOW": "0.2"}, ["CLIP_RANGE_LOW", "number"]),
    ({"KL_IN_LOSS": True, "ADAPTIVE_KL": True}, ["ADAPTIVE_KL", "KL_IN_LOSS"]),
    ({"KL_LOSS_COEF": -1.0}, ["KL_LOSS_COEF", ">= 0"]),
    ({"DYNAMIC_SAMPLING": True}, ["DYNAMIC_SAMPLING", "'gae'", "'grpo'"]),
    ({"DYNAMIC_SAMPLING": True, "ADVANTAGE_ESTIMATOR": "grpo"}, ["KL_COEF = 0.05", "KL_COEF = 0 ", "KL_IN_LOSS"]),
    ({"OVERLONG_BUFFER": 200, "MAX_NEW_TOKENS": 128}, ["OVERLONG_BUFFER", "MAX_NEW_TOKENS = 128"]),
    ({"OVERLONG_BUFFER": 16, "OVERLONG_PENALTY": -1.0}, ["OVERLONG_PENALTY", ">= 0"]),
    ({"LAM": 1.5}, ["LAM", "[0, 1]"]),
    ({"TRAIN_DATASETS": []}, ["TRAIN_DATASETS", "at least one"]),
])
def test_out_of_range_values(override, words):
    cfg = ppo.make_config(override)
    with pytest.raises(ppo.ConfigError) as error:
        ppo.validate_config(cfg)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_trainer_rejects_unknown_keyword():
    with pytest.raises(ppo.ConfigError, match="Did you mean GROUP_EPOCHES"):
        ppo.PPOTrainer(GROUP_EPOCHS=2)


def test_train_main_reports_config_errors_without_traceback(capsys):
    assert ppo.train_main(["--GROUP_SIZE=0"]) == 2
    err = capsys.readouterr().err
    assert "GROUP_SIZE = 0 must be > 0" in err and "Traceback" not in err


def test_import_has_no_side_effects(tmp_path):
    """Importing ppo creates no file or folder, prints nothing and loads no model."""
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import ppo; print(len(ppo.CONFIG_KEYS))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().isdigit() and out.stderr == ""
    assert list(tmp_path.iterdir()) == []
