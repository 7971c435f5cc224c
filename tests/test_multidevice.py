"""Data parallelism: sharded steps and inference over 4 fake CPU devices equal one device.

Depth 0 by default to keep the compile time low (DPMAMBA_MULTIDEVICE_DEPTH=1 adds a Mamba block;
passed in 166 s on the loaded 2-core box).

The checks run in a subprocess (this file run as a script) because the fake device count
(XLA_FLAGS=--xla_force_host_platform_device_count=4) must be set before jax starts.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DEV = 4
ATOL, RTOL = 2e-5, 2e-4
DEPTH = int(os.environ.get("DPMAMBA_MULTIDEVICE_DEPTH", "0"))


def _run_worker(*args: str) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={N_DEV}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  if r.returncode != 0:
    pytest.fail(f"worker failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_steps_and_inference_equal_single_device():
  out = _run_worker()
  assert out["devices"] == N_DEV
  assert out["teacher_devices"] == N_DEV and out["student_devices"] == N_DEV
  assert out["predict_collectives"], "the sharded predict step has no cross-device collective"
  assert out["fallback"] is None and out["disabled"] is None  # 6 % 4 != 0; switched off
  assert out["ok"]


# ----------------------------------------------------------------------------------------------
# The worker (runs with 4 fake devices).


def _worker() -> dict:
  import chex
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  from dpmamba_jax import data, inference, sharding, steps
  from dpmamba_jax import model as model_lib
  from dpmamba_jax.inference import Predictor

  assert jax.device_count() == N_DEV, jax.devices()
  rng = np.random.default_rng(0)
  h, w, p, c, d, b = 9, 11, 5, 4, 32, 8
  cubes_np = [rng.normal(size=(h, w, 6)).astype(np.float32),
              rng.normal(size=(h, w, 2)).astype(np.float32)]
  cubes = [jnp.asarray(x) for x in data.pad_cubes(cubes_np, p)]
  z = jnp.asarray(rng.normal(size=(c, d)).astype(np.float32))
  idx = rng.choice(h * w, b, replace=False).astype(np.int32)
  labels = np.repeat(np.arange(c, dtype=np.int32), b // c)  # class-sorted, k = 2 per class
  cfg = model_lib.ModelConfig.tiny(depth=DEPTH, out_dim=d, patch_size=p, af_dropout=0.3)
  # SGD keeps parameter differences proportional to gradient differences; Adam's g / sqrt(v)
  # turns float noise in ~zero gradients (conv biases before BatchNorm) into lr-sized steps.
  tx, sched = optax.sgd(0.1), optax.constant_schedule(0.1)
  mesh = sharding.data_parallel_mesh(b, log=None)
  assert mesh is not None and mesh.size == N_DEV
  rep = lambda t: sharding.replicate(t, mesh)
  shard = lambda a: sharding.shard_batch(a, mesh)
  copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)
  close = lambda a, b_: chex.assert_trees_all_close(a, b_, atol=ATOL, rtol=RTOL)

  # Teacher: two steps (BatchNorm stats, Adam moments and dropout all go through the sharding).
  teacher = model_lib.DPMamba(cfg, rngs=nnx.Rngs(0))
  graphdef, state0 = steps.init_train_state(teacher, tx, jax.random.PRNGKey(1))
  step1 = steps.make_teacher_step(graphdef, tx, sched, width=w, patch_size=p)
  stepn = steps.make_teacher_step(graphdef, tx, sched, width=w, patch_size=p, mesh=mesh)
  s1, s2 = copy(state0), rep(copy(state0))
  for _ in range(2):
    s1, m1 = step1(s1, cubes, z, jnp.asarray(idx), jnp.asarray(labels))
    s2, m2 = stepn(s2, rep(cubes), rep(z), shard(idx), shard(labels))
  close(jax.device_get(m1), jax.device_get(m2))
  close(jax.device_get(s1), jax.device_get(s2))
  teacher_devices = len(jax.tree.leaves(s2.params)[0].sharding.device_set)

  # Student: the teacher's weights (eval mode) + prompts, masks sampled in the step.
  t_graphdef, t_params, t_rest = steps.split_model(teacher)
  student = model_lib.DPMamba(cfg.replace(prompts=True), rngs=nnx.Rngs(1))
  sgraph, sstate0 = steps.init_train_state(student, tx, jax.random.PRNGKey(2))
  kw = dict(width=w, patch_size=p, num_modalities=2, batch_size=b)
  sstep1 = steps.make_student_step(sgraph, tx, sched, **kw)
  sstepn = steps.make_student_step(sgraph, tx, sched, mesh=mesh, **kw)
  fkw = dict(width=w, patch_size=p, batch_size=b)
  feats1 = steps.make_teacher_features(t_graphdef, **fkw)((t_params, t_rest), cubes, idx)
  featsn = steps.make_teacher_features(t_graphdef, mesh=mesh, **fkw)(
      rep((t_params, t_rest)), rep(cubes), idx)
  close(feats1, featsn)
  u1, u2 = copy(sstate0), rep(copy(sstate0))
  rows = np.arange(b, dtype=np.int32)
  u1, n1 = sstep1(u1, jnp.asarray(feats1), cubes, z, jnp.asarray(rows), jnp.asarray(idx),
                  jnp.asarray(labels))
  u2, n2 = sstepn(u2, rep(featsn), rep(cubes), rep(z), shard(rows), shard(idx), shard(labels))
  close(jax.device_get(n1), jax.device_get(n2))
  close(jax.device_get(u1), jax.device_get(u2))
  student_devices = len(n2["loss"].sharding.device_set)

  # Inference over the whole scene, batch 8 (last batch padded), two scenarios; the 6-band
  # modality through the scene conv (Predictor.prepare_scene), and also from its plain cube.
  inference.SCENE_CONV_MIN_BANDS = 6
  trained = nnx.merge(sgraph, u1.params, u1.batch_stats)
  pred1 = Predictor(trained, width=w, patch_size=p, batch=b)
  predn = Predictor(trained, width=w, patch_size=p, batch=b, mesh=mesh)
  assert isinstance(predn.prepare_scene(cubes)[0], dict)
  all_idx = np.arange(h * w, dtype=np.int32)
  for row in (None, np.array([0.0, 1.0], np.float32)):
    a = pred1.predict_pixels(cubes, z, all_idx, row)
    a2 = predn.predict_pixels(cubes, z, all_idx, row)
    inference.SCENE_CONV_MIN_BANDS = 1 << 30  # no scene conv: the cubes as they are
    plain = pred1.predict_pixels(cubes, z, all_idx, row)
    inference.SCENE_CONV_MIN_BANDS = 6
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(a, plain)
  hlo = predn.program.lower(predn.params, predn.rest, rep(cubes), rep(z), shard(all_idx[:b]),
                            shard(np.ones((b, 2), np.float32))).compile().as_text()
  collectives = any(op in hlo for op in ("all-gather", "all-reduce", "collective-permute",
                                         "all-to-all"))
  msgs = []
  fallback = sharding.data_parallel_mesh(6, log=msgs.append)
  disabled = sharding.data_parallel_mesh(8, enabled=False, log=msgs.append)
  assert len(msgs) == 2 and "not a multiple" in msgs[0] and "off" in msgs[1], msgs
  return {"devices": jax.device_count(), "teacher_devices": teacher_devices,
          "student_devices": student_devices, "predict_collectives": collectives,
          "fallback": fallback, "disabled": disabled, "ok": True}


if __name__ == "__main__":
  print(json.dumps(_worker()))
