"""Every numeric setting is validated when the config is resolved, before anything is loaded or
written: a one-line `error: config KEY=VALUE: expected ...` (exit 2) and no workdir."""
import pytest

from cli_errors import assert_one_line_error, run_cli
from dpmamba_jax import train

CASES = [
    (["--set", "lr=nan"], "config lr=nan: expected a finite float > 0"),
    (["--set", "lr=inf"], "config lr=inf: expected a finite float > 0"),
    (["--set", "lr=0"], "config lr=0.0: expected a finite float > 0"),
    (["--set", "weight_decay=nan"], "config weight_decay=nan: expected a finite float >= 0"),
    (["--set", "weight_decay=-0.1"], "config weight_decay=-0.1"),
    (["--set", "grad_clip=0"], "config grad_clip=0.0: expected a finite float > 0"),
    (["--set", "grad_clip=inf"], "config grad_clip=inf"),
    (["--set", "eps=nan"], "config eps=nan"),
    (["--set", "betas_pretrain=nan,0.999"], "config betas_pretrain=(nan, 0.999)"),
    (["--set", "betas_distill=0.9,1.0"], "config betas_distill=(0.9, 1.0): expected two floats"),
    (["--set", "patch_size=4"], "config patch_size=4: expected an odd int"),
    (["--set", "patch_size=0"], "config patch_size=0: expected an int >= 1"),
    (["--set", "batch_size=0"], "config batch_size=0: expected an int >= 1"),
    (["--set", "batch_size=7"], "config batch_size=7: expected a multiple of the 6 classes"),
    (["--set", "eval_batch=0"], "config eval_batch=0: expected an int >= 1"),
    (["--set", "eval_batch=-4"], "config eval_batch=-4: expected an int >= 1"),
    (["--set", "train_per_class=0"], "config train_per_class=0: expected an int >= 1"),
    (["--set", "log_every=0"], "config log_every=0"),
    (["--set", "ckpt_every=-1"], "config ckpt_every=-1"),
    (["--set", "eval_subsample=-1"], "config eval_subsample=-1"),
    (["--set", "warmup_epochs=-1"], "config warmup_epochs=-1"),
    (["--seed", "-1"], "config seed=-1: expected an int from 0 to 1073741824"),
    (["--set", "seed=-3"], "config seed=-3: expected an int from 0 to 1073741824"),
    (["--seed", "99999999999999999999999"], "config seed=99999999999999999999999: expected an int"),
    (["--set", "eval_batch=1000000000"], "config eval_batch=1000000000: expected at most 65536"),
    (["--epochs", "0"], "--epochs 0: expected an int >= 1"),
    (["--runs", "0"], "--runs 0: expected an int >= 1"),
    (["--set", "hidden=3"], "config hidden=3: expected an even int >= 2"),
    (["--set", "heads_per_direction=5"], "config heads_per_direction=5: expected a divisor"),
    (["--set", "depth=-1"], "config depth=-1: expected an int >= 0"),
    (["--set", "d_state=0"], "config d_state=0: expected an int >= 1"),
    (["--set", "af_dropout=1"], "config af_dropout=1.0: expected a float in [0, 1)"),
    (["--set", "af_dropout=nan"], "config af_dropout=nan"),
    (["--set", "scan_impl=chunked"], "config scan_impl='chunked'"),
    (["--set", "synthetic_height=0"], "config synthetic_height=0"),
    (["--set", "lr=fast"], "--set lr=fast: lr='fast'"),
    (["--set", "nonsense=1"], "unknown config key 'nonsense'"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_setting_is_one_line_error_and_writes_nothing(capsys, tmp_path, argv, message):
  workdir = tmp_path / "run"
  rc, _, err = run_cli(capsys, train.main, ["--workdir", workdir, "--quiet", *argv])
  assert_one_line_error(rc, err, message)
  assert not workdir.exists()
