"""Tests for checkpoint.py: model save/load round trip, periodic train checkpoints."""
import os

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dpmamba_jax import checkpoint, errors, steps
from dpmamba_jax import model as model_lib


def _cfg(**kw):
  return model_lib.ModelConfig.tiny(bands=(3, 1), patch_size=3, depth=0, hidden=8, out_dim=8,
                                    **kw)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_save_load_model_round_trip(tmp_path):
  cfg = _cfg(prompts=True)
  model = model_lib.DPMamba(cfg, rngs=nnx.Rngs(3))
  # Make the BatchNorm statistics non-trivial so that they are checked too.
  xs = [jnp.ones((4, 3, 3, 3)) * 2.0, jnp.ones((4, 3, 3, 1))]
  model(xs, None, train=True)
  path = tmp_path / "teacher"
  checkpoint.save_model(path, model, cfg, {"epochs": 7, "stage": "pretrain"})
  assert checkpoint.is_model_checkpoint(path)
  loaded, cfg2, meta = checkpoint.load_model(path)
  assert cfg2 == cfg and isinstance(cfg2.bands, tuple)
  assert meta == {"epochs": 7, "stage": "pretrain"}
  a, b = nnx.state(model), nnx.state(loaded)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)
  mask = jnp.array([[1, 0], [0, 1], [1, 1], [1, 0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(model(xs, mask)), np.asarray(loaded(xs, mask)))
  # Overwriting is allowed (atomic replace by orbax).
  checkpoint.save_model(path, model, cfg, {"epochs": 8})
  assert checkpoint.load_model(path)[2] == {"epochs": 8}


def test_load_model_missing_is_user_error(tmp_path):
  with pytest.raises(errors.UserError, match="not a model checkpoint"):
    checkpoint.load_model(tmp_path / "nothing")


@pytest.mark.slow
def test_train_checkpoints_round_trip(tmp_path):
  model = model_lib.DPMamba(_cfg(), rngs=nnx.Rngs(0))
  oc = steps.OptimConfig(lr=1e-3, warmup_init=1e-4, lr_min=1e-5, warmup_steps=2, total_steps=10)
  tx, _ = steps.make_optimizer(oc)
  _, state = steps.init_train_state(model, tx, jax.random.PRNGKey(5))
  # Change every part of the state.
  grads = jax.tree.map(jnp.ones_like, state.params)
  upd, opt = tx.update(grads, state.opt_state, state.params)
  state = state.replace(params=jax.tree.map(lambda p, u: p + u, state.params, upd),
                        opt_state=opt, step=state.step + 3,
                        rng=jax.random.split(state.rng)[0])
  ck = checkpoint.TrainCheckpoints(tmp_path / "ckpt", max_to_keep=2)
  assert ck.latest_epoch() is None
  for e in (1, 2, 3):
    ck.save(e, state, {"epoch": e, "wall_time_s": 1.5 * e})
  assert ck.latest_epoch() == 3
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["2", "3"]  # max_to_keep
  # A half-written (uncommitted) checkpoint from a kill is not taken as the latest.
  os.makedirs(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-123")
  ck.close()
  ck = checkpoint.TrainCheckpoints(tmp_path / "ckpt")
  assert ck.latest_epoch() == 3
  _, fresh = steps.init_train_state(model_lib.DPMamba(_cfg(), rngs=nnx.Rngs(1)), tx,
                                    jax.random.PRNGKey(0))
  restored, meta = ck.restore(fresh)
  assert meta == {"epoch": 3, "wall_time_s": 4.5}
  assert type(restored) is type(state)
  assert (jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(state))
  for x, y in zip(_leaves(state), _leaves(restored)):
    np.testing.assert_array_equal(x, y)
  ck.close()


# scan_impl is a run-time choice: checkpoints do not store it and load with either.


def _inputs(cfg, b=3):
  keys = jax.random.split(jax.random.PRNGKey(1), cfg.num_modalities)
  return [jax.random.normal(k, (b, cfg.patch_size, cfg.patch_size, c))
          for k, c in zip(keys, cfg.bands)]


def _scan_cfg(**kw):  # _cfg with one Mamba block, so that the scan runs
  return model_lib.ModelConfig.tiny(bands=(3, 1), patch_size=3, depth=1, hidden=8, out_dim=8,
                                    heads_per_direction=2, **kw)


def _forward(model, xs):
  return model_lib.make_forward(model)(nnx.state(model), xs)


@pytest.mark.slow
def test_checkpoint_leaves_out_scan_impl_and_loads_with_either(tmp_path):
  cfg = _scan_cfg(scan_impl="associative")
  model = model_lib.DPMamba(cfg, rngs=nnx.Rngs(0))
  checkpoint.save_model(tmp_path / "m", model, cfg, {"stage": "pretrain"})
  with open(tmp_path / "m" / "config" / "metadata") as f:
    assert "scan_impl" not in json.load(f)
  xs = _inputs(cfg)
  want = _forward(model, xs)
  for impl in ("recurrent", "associative"):
    loaded, lcfg, meta = checkpoint.load_model(tmp_path / "m", scan_impl=impl)
    assert lcfg.scan_impl == impl and meta == {"stage": "pretrain"}
    assert lcfg.replace(scan_impl="associative") == cfg
    np.testing.assert_allclose(_forward(loaded, xs), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_checkpoint_naming_a_retired_scan_impl_still_loads(tmp_path):
  """Checkpoints written before scan_impl left the config may name "chunked" or "sequential"."""
  cfg = _scan_cfg()
  model = model_lib.DPMamba(cfg, rngs=nnx.Rngs(0))
  old = dict(checkpoint.config_to_json(cfg), scan_impl="chunked")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(str(tmp_path / "old"), args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.state(model)), config=ocp.args.JsonSave(old),
        meta=ocp.args.JsonSave({})))
  loaded, lcfg, _ = checkpoint.load_model(tmp_path / "old")
  assert lcfg.scan_impl == "auto"
  xs = _inputs(cfg)
  np.testing.assert_allclose(_forward(loaded, xs), _forward(model, xs), rtol=1e-5, atol=1e-5)
