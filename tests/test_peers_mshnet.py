"""MSH-Net (dpmamba_jax.peers.mshnet) against the golden vectors of its public PyTorch code
(peers/mshnet_*.npz): teacher eval and train outputs, BatchNorm buffers after a train forward,
single networks, students and their JDA loss terms, ensembles, missing-modality outputs,
parameter counts; plus the stage list, builders, losses and classify for 3 modalities."""
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peer_golden
from conftest import parity_dir
from dpmamba_jax import method
from dpmamba_jax.model.network import param_count
from dpmamba_jax.peers import mshnet as msh

FILES = peer_golden.golden_files("mshnet")
RTOL = 1e-4


def close(got, ref) -> None:
  """Relative tolerance 1e-4 of the reference's largest magnitude."""
  ref = np.asarray(ref, np.float32)
  atol = RTOL * max(float(np.abs(ref).max()), 1e-12)
  chex.assert_trees_all_close(np.asarray(got, np.float32), ref, rtol=RTOL, atol=atol)


def nchw(x: jax.Array) -> np.ndarray:
  """(B, H, W, C) -> PyTorch's (B, C, H, W)."""
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


class Recorder(dict):
  """A state dict that remembers which names were read."""

  def __init__(self, *args):
    super().__init__(*args)
    self.read: set[str] = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


def test_golden_files_found():
  assert FILES, f"no peers/mshnet_*.npz under {parity_dir()}"


@pytest.fixture(scope="module", params=FILES, ids=lambda p: p.stem)
def golden(request):
  with np.load(request.param) as f:
    d = {k: f[k] for k in f.files}
  meta = json.loads(str(d["meta/json"]))
  names = tuple(k[len("inputs/"):-len("_cl")] for k in sorted(d)
                if k.startswith("inputs/") and k.endswith("_cl"))
  names = tuple(sorted(names, key=lambda n: n != "hsi"))  # HSI first
  assert names == msh.modality_names(len(names))
  xs = [jnp.asarray(d[f"inputs/{n}_cl"]) for n in names]
  return {"d": d, "meta": meta, "names": names, "xs": xs,
          "labels": jnp.asarray(d["inputs/labels"]),
          "bands": tuple(x.shape[-1] for x in xs), "classes": int(meta["classes"]),
          "patch": int(meta["patch_size"])}


def state_dict(d: dict, network: str) -> tuple[Recorder, Recorder]:
  """params/<network>/... and buffers/<network>/... with the network prefix removed."""
  out = []
  for group in ("params", "buffers"):
    head = f"{group}/{network}/"
    out.append(Recorder({k[len(head):]: v for k, v in d.items() if k.startswith(head)}))
  return out[0], out[1]


def nan_shell(stage: str, g: dict) -> nnx.Module:
  """A stage's model built from shapes only (its random initialisers never run: their compiles
  dominated this file's time), every variable NaN so that one the importer missed shows."""
  abstract = nnx.eval_shape(
      lambda: msh.build_stage(stage, g["bands"], g["classes"], g["patch"], {}, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  # jax arrays, not numpy ones: nnx.clone shares a numpy buffer, and loading into a clone would
  # then write through to the original
  return nnx.merge(graphdef, jax.tree.map(
      lambda v: jnp.asarray(np.full(v.shape, np.nan, v.dtype)), state))


@pytest.fixture(scope="module")
def loaded(golden):
  """Every stage's model with the file's weights, and the parameter names each importer read."""
  g, d = golden, golden["d"]
  models, read = {}, {}
  for stage in msh.stages(len(g["names"])):
    if stage.startswith("ensemble_"):
      continue
    model = nan_shell(stage, g)
    params, buffers = state_dict(d, stage)
    msh.load_torch(model, params, buffers)
    models[stage], read[stage] = model, params.read
  for n in g["names"]:
    ens = msh.build_stage(f"ensemble_{n}", g["bands"], g["classes"], g["patch"], models,
                          nnx.Rngs(1))
    # Their Hallucination_ensemble state dict: modality_1_model is bit-identical to student_<n>,
    # modality_2_model to single_<n> (meta/json); only the fuse weights are stored separately.
    params = {f"fuse_weight_{k}": d[f"params/ensemble_{n}/fuse_weight_{k}"] for k in (1, 2)}
    for sub, src in (("modality_1_model", f"student_{n}"), ("modality_2_model", f"single_{n}")):
      for w in ("weight", "bias"):
        params[f"{sub}.fc.{w}"] = d[f"params/{src}/fc.{w}"]
    msh.load_torch(ens, params, {})
    models[f"ensemble_{n}"] = ens
  return models, read


@pytest.fixture(scope="module")
def teacher_eval(golden, loaded):
  return loaded[0]["teacher"].outputs(golden["xs"], train=False, paths=True)


@pytest.fixture(scope="module")
def teacher_train(golden, loaded):
  model = nnx.clone(loaded[0]["teacher"])
  g = golden
  keep = jnp.ones((g["xs"][0].shape[0], len(g["xs"])), jnp.float32)
  probe = nnx.clone(model)
  out = probe.outputs(g["xs"], train=True, paths=True)
  total, terms, logits = msh.teacher_loss(model, {}, g["xs"], keep, g["labels"],
                                          jax.random.key(0))
  return model, out, total, terms, logits


@pytest.fixture(scope="module")
def students_train(golden, loaded):
  """Per modality: (model after the loss's train forward, train outputs, total, terms)."""
  g, models = golden, loaded[0]
  keep = jnp.ones((g["xs"][0].shape[0], len(g["xs"])), jnp.float32)
  result = {}
  for i, n in enumerate(g["names"]):
    student = nnx.clone(models[f"student_{n}"])
    out = nnx.clone(student).outputs(g["xs"][i], train=True)
    total, terms, _ = msh.student_loss(student, models, g["xs"], keep, g["labels"],
                                       jax.random.key(0))
    result[n] = (student, out, total, terms)
  return result


def check_bn_after(model: nnx.Module, d: dict, network: str) -> None:
  """The model's running statistics against outputs/train/bn_after/<network>/...: the expected
  buffers are read through the importer into a copy, then the BatchStats are compared."""
  head = f"outputs/train/bn_after/{network}/"
  after = {k[len(head):]: v for k, v in d.items() if k.startswith(head)}
  layers = [k for k in after if k.endswith(".running_mean")]
  assert layers
  expected = nnx.clone(model)
  params, _ = state_dict(d, network)
  msh.load_torch(expected, params, after)
  got = jax.tree_util.tree_leaves(nnx.state(model, nnx.BatchStat))
  want = jax.tree_util.tree_leaves(nnx.state(expected, nnx.BatchStat))
  assert len(got) == len(want) == 2 * len(layers)
  for a, b in zip(got, want):
    close(a, b)


# ------------------------------------------------------------------------- parameter counts

def test_param_counts(golden, loaded):
  models, read = loaded
  meta = golden["meta"]
  for stage, model in models.items():
    if stage.startswith("ensemble_"):
      [key] = [k for k in meta["param_counts"] if k.startswith(stage)]
      assert param_count(model) == meta["param_counts"][key]
      continue
    unused = meta["unused_in_forward"][stage]
    assert param_count(model) == (meta["param_counts"][stage]
                                  - unused["param_count_unused_in_forward"])
    assert param_count(model) == unused["param_count_used_in_forward"]
    stored = {k[len(f"params/{stage}/"):] for k in golden["d"]
              if k.startswith(f"params/{stage}/")}
    assert read[stage] == stored - set(unused["params_unused_in_forward"]), stage


def test_ensemble_count_is_two_classifiers_and_two_weights(golden, loaded):
  c = golden["classes"]
  width = loaded[0]["teacher"].cfg.head_widths[1]
  for n in golden["names"]:
    assert param_count(loaded[0][f"ensemble_{n}"]) == 2 * (width * c + c) + 2


# --------------------------------------------------------------------------------- teacher

def test_teacher_eval(golden, teacher_eval):
  d, out = golden["d"], teacher_eval
  close(out.logits, d["outputs/logits"])
  close(out.fused_feature, d["outputs/fused_feature"])
  close(nchw(out.feature_map), d["outputs/teacher_feature_map"])
  assert len(out.path_logits) == 2
  close(out.path_logits[0], d["outputs/logits_joint_hsi_path"])
  close(out.path_logits[1], d["outputs/logits_joint_lidar_path"])


def test_teacher_call_is_fused_logits(golden, loaded, teacher_eval):
  close(loaded[0]["teacher"](golden["xs"]), teacher_eval.logits)


def test_teacher_train(golden, teacher_train):
  d = golden["d"]
  model, out, total, terms, logits = teacher_train
  close(out.logits, d["outputs/train/logits"])
  close(logits, d["outputs/train/logits"])
  close(out.fused_feature, d["outputs/train/fused_feature"])
  close(out.path_logits[0], d["outputs/train/logits_joint_hsi_path"])
  close(out.path_logits[1], d["outputs/train/logits_joint_lidar_path"])
  close(terms["ce"], d["losses/teacher_ce"])
  # Their train_base_multi adds MSE(x2, x1) + MSE(x3, x1) of the train-mode logits.
  x1 = d["outputs/train/logits"].astype(np.float64)
  mse_hsi = np.mean((d["outputs/train/logits_joint_hsi_path"] - x1) ** 2)
  mse_lidar = np.mean((d["outputs/train/logits_joint_lidar_path"] - x1) ** 2)
  close(terms["path_mse_hsi"], mse_hsi)
  close(terms["path_mse_lidar"], mse_lidar)
  close(total, float(d["losses/teacher_ce"]) + mse_hsi + mse_lidar)
  check_bn_after(model, d, "teacher")


# ------------------------------------------------------------- single networks and students

def test_networks_eval(golden, loaded):
  d, models = golden["d"], loaded[0]
  for i, n in enumerate(golden["names"]):
    s = models[f"student_{n}"].outputs(golden["xs"][i])
    close(s.logits, d[f"outputs/student_{n}/logits"])
    close(nchw(s.feature_map), d[f"outputs/student_{n}/feature_map"])
    close(models[f"student_{n}"](golden["xs"]), d[f"outputs/student_{n}/logits"])
    close(models[f"single_{n}"](golden["xs"]), d[f"outputs/single_{n}/logits"])


def test_students_train(golden, students_train):
  d = golden["d"]
  for n, (model, out, total, terms) in students_train.items():
    close(out.logits, d[f"outputs/train/student_{n}/logits"])
    close(nchw(out.feature_map), d[f"outputs/train/student_{n}/feature_map"])
    for term in ("ce", "mmd", "kl", "jda"):
      close(terms[term], d[f"losses/student_{n}/{term}"])
    close(total, d[f"losses/student_{n}/total"])
    check_bn_after(model, d, f"student_{n}")


def test_student_weights_follow_their_scripts(golden, loaded):
  cfg = loaded[0]["teacher"].cfg
  assert dict(zip(golden["names"], cfg.jda_weights)) == {"hsi": (2.0, 1.0), "lidar": (2.0, 5.0)}


def test_single_loss_is_ce(golden, loaded):
  model = nnx.clone(loaded[0][f"single_{golden['names'][0]}"])
  keep = jnp.ones((golden["xs"][0].shape[0], len(golden["xs"])), jnp.float32)
  total, terms, logits = msh.single_loss(model, {}, golden["xs"], keep, golden["labels"],
                                         jax.random.key(0))
  logp = jax.nn.log_softmax(logits)
  close(total, -np.mean(np.take_along_axis(np.asarray(logp),
                                           np.asarray(golden["labels"])[:, None], 1)))
  assert set(terms) == {"ce"}


# ------------------------------------------------------------ ensembles and missing modality

def test_missing_modality_outputs(golden, loaded, teacher_eval):
  d, models, xs = golden["d"], loaded[0], golden["xs"]
  b = xs[0].shape[0]
  rows = {"missing_lidar": [1.0, 0.0], "missing_hsi": [0.0, 1.0]}
  for scenario, row in rows.items():
    keep = jnp.tile(jnp.asarray([row]), (b, 1))
    close(msh.classify(models, xs, keep), d[f"outputs/{scenario}/logits"])
  close(msh.classify(models, xs, jnp.ones((b, 2))), d["outputs/logits"])
  # Mixed batch: each sample gets its own scenario's model.
  keep = jnp.asarray([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]] * b)[:b]
  want = np.where(np.asarray(keep[:, 1:2]) == 0, d["outputs/missing_lidar/logits"],
                  np.where(np.asarray(keep[:, :1]) == 0, d["outputs/missing_hsi/logits"],
                           d["outputs/logits"]))
  close(msh.classify(models, xs, keep), want)


def test_ensemble_loss_trains_only_its_four_tensors(golden, loaded):
  d, models, xs = golden["d"], loaded[0], golden["xs"]
  keep = jnp.ones((xs[0].shape[0], 2), jnp.float32)
  frozen = {k: v for k, v in models.items() if not k.startswith("ensemble_")}
  for n, scenario in zip(golden["names"], ("missing_lidar", "missing_hsi")):
    ens = models[f"ensemble_{n}"]

    def loss(m):
      total, terms, logits = msh.ensemble_loss(m, frozen, xs, keep, golden["labels"],
                                               jax.random.key(0))
      return total, (terms, logits)

    (_, (terms, logits)), grads = nnx.value_and_grad(loss, has_aux=True)(ens)
    close(logits, d[f"outputs/{scenario}/logits"])
    leaves = jax.tree_util.tree_leaves(grads)
    assert len(leaves) == 6 and sum(x.size for x in leaves) == param_count(ens)
    assert all(np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() > 0
               for x in leaves)
    assert set(terms) == {"ce"}


def test_built_ensemble_starts_as_the_student(golden, loaded):
  g, models = golden, loaded[0]
  for i, n in enumerate(g["names"]):
    ens = msh.build_stage(f"ensemble_{n}", g["bands"], g["classes"], g["patch"], models,
                          nnx.Rngs(3))
    got = msh.ensemble_logits(ens, models[f"student_{n}"], models[f"single_{n}"], g["xs"][i])
    close(got, g["d"][f"outputs/student_{n}/logits"])


# --------------------------------------------------------------- stages, M = 3, errors, jit

def _shapes(bands, num_classes, patch_size):
  return method.Shapes(bands=bands, num_classes=num_classes, patch_size=patch_size,
                       modalities=("HSI", "SAR", "LiDAR")[:len(bands)], text_dim=0)


def test_stage_lists():
  assert msh.stages(2) == ("teacher", "single_hsi", "single_lidar", "student_hsi",
                           "student_lidar", "ensemble_hsi", "ensemble_lidar")
  assert msh.stages(3)[1:4] == ("single_hsi", "single_sar", "single_lidar")
  assert len(msh.stages(3)) == 10
  for m in (1, 4):
    with pytest.raises(ValueError, match="2 or 3 modalities"):
      msh.stages(m)
    with pytest.raises(ValueError, match="2 or 3 modalities"):
      msh.build_teacher((5,) * m, 3, 5, {}, nnx.Rngs(0))
  with pytest.raises(ValueError, match="no modality 'sar'"):
    msh.build_single_sar(_shapes((5, 1), 3, 5), {}, nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown MSH-Net stage"):
    msh.stage_loss("teachers")
  with pytest.raises(KeyError, match="student_hsi"):
    msh.build_ensemble_hsi(_shapes((5, 1), 3, 5), {}, nnx.Rngs(0))


def numpy_init(build, seed: int) -> nnx.Module:
  """The module `build()` returns, traced from shapes only and filled with seeded numpy values
  (weights ~ N(0, 1 / fan_in), BatchNorm mean 0 and variance 1): its random initialisers, whose
  eager compiles would dominate the test, never run."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  rng = np.random.default_rng(seed)

  def weight(v):
    fan_in = int(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 100
    return jnp.asarray(rng.normal(0.0, fan_in ** -0.5, v.shape).astype(v.dtype))

  params = jax.tree.map(weight, params)
  rest = nnx.State.from_flat_path({
      path: jnp.full(v.shape, 1.0 if path[-1] == "var" else 0.0, v.dtype)
      for path, v in nnx.to_flat_state(rest)})
  return nnx.merge(graphdef, params, rest)


@pytest.mark.slow
def test_three_modalities():
  """All ten stages built in order (the conv networks traced from shapes, numpy-initialised;
  the ensembles built for real from their frozen classifiers) and run through their losses once;
  classify on a batch with every keep pattern (pairs get the mean of their two ensembles). Shapes
  as in the golden file so that the eager op compilations are shared."""
  cfg = msh.MSHNetConfig.create((63, 1, 1), 6, 7)
  b, p = 8, cfg.patch_size
  keys = jax.random.split(jax.random.key(0), 3)
  xs = [jax.random.normal(k, (b, p, p, c)) for k, c in zip(keys, cfg.bands)]
  labels = jnp.arange(b) % cfg.num_classes
  models: dict[str, nnx.Module] = {}
  for i, stage in enumerate(msh.stages(3)):
    build = functools.partial(lambda stage, i: msh.build_stage(
        stage, cfg.bands, cfg.num_classes, p, models, nnx.Rngs(i)), stage, i)
    model = build() if stage.startswith("ensemble_") else numpy_init(build, i)
    total, terms, logits = msh.stage_loss(stage)(model, models, xs, jnp.ones((b, 3)), labels,
                                                 jax.random.key(i))
    chex.assert_shape(logits, (b, cfg.num_classes))
    assert np.isfinite(float(total)) and all(np.isfinite(float(v)) for v in terms.values())
    models[stage] = model
  assert set(models) == set(msh.stages(3))
  assert cfg.jda_weights == ((2.0, 1.0), (1.0, 5.0), (1.0, 5.0))
  keep = jnp.asarray([[1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1],
                      [1, 0, 1], [0, 0, 0]], jnp.float32)
  got = msh.classify(models, xs, keep)
  ens = [msh.ensemble_logits(models[f"ensemble_{n}"], models[f"student_{n}"],
                             models[f"single_{n}"], x) for n, x in zip(cfg.names, xs)]
  full = models["teacher"](xs)
  close(got[0], full[0])
  close(got[7], full[7])
  for row, present in ((1, [0]), (2, [1]), (3, [2]), (4, [0, 1]), (5, [1, 2]), (6, [0, 2])):
    close(got[row], sum(ens[m][row] for m in present) / len(present))


def test_tiny_config_shapes():
  """Output shapes of the tiny config (traced only: jax.eval_shape compiles nothing)."""
  cfg = msh.MSHNetConfig.tiny()
  b, p = 2, cfg.patch_size
  xs = [jnp.ones((b, p, p, c)) for c in cfg.bands]

  def run():
    teacher = msh.Teacher(cfg, rngs=nnx.Rngs(0))
    uni = msh.UniNet(cfg, 1, rngs=nnx.Rngs(1))
    return teacher.outputs(xs), uni.outputs(xs[1])

  out, uni = jax.eval_shape(run)
  q = (p + 1) // 2
  chex.assert_shape([out.logits, *out.path_logits, uni.logits], (b, cfg.num_classes))
  chex.assert_shape([out.feature_map, uni.feature_map], (b, q, q, cfg.head_widths[1]))
