"""DPMamba model: config, parameter counts, init, masks/prompts, BatchNorm, dropout, jit, import."""
import functools
import json
import os
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpmamba_jax import data, summary
from dpmamba_jax.errors import UserError
from dpmamba_jax.model import DPMamba, ModelConfig, abstract_model, make_forward, param_count
from dpmamba_jax.model import conv as conv_lib
from dpmamba_jax.model import scan, torch_import
from dpmamba_jax.model.blocks import AttentionFusion, MaskedBatchNorm
from dpmamba_jax.model.network import capture_intermediates
from scan_reference import selective_scan_sequential

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------ config and parameter counts

PINNED = [  # spec §8.1: (bands, P, teacher, student)
    ((63, 1), 15, 147_526, 176_326),  # trento
    ((48, 1), 11, 138_886, 154_374),  # houston, 48 PCs
    ((48, 4), 9, 140_614, 150_982),  # augsburg HSI+SAR, 48 PCs
    ((48, 4, 1), 9, 189_448, 205_000),  # hypothetical 3-modality augsburg
]


@pytest.mark.parametrize("bands,p,teacher,student", PINNED)
def test_param_counts_pinned(bands, p, teacher, student):
  cfg = ModelConfig(bands=bands, patch_size=p)
  assert param_count(abstract_model(cfg)) == teacher
  assert param_count(abstract_model(cfg.replace(prompts=True))) == student
  counts = summary.component_counts(cfg.replace(prompts=True))
  assert counts["total"] == student
  assert counts["components"]["prompts"] == len(bands) * 64 * p * p
  assert counts["block_detail"]["block.0.cross"] == 6_817 * (len(bands) >= 2)
  assert counts["batch_stats"] == 2 * 64 * len(bands)  # running stats are not Params


def test_for_dataset_and_registry():
  spec = types.SimpleNamespace(model_bands=(48, 4), patch_size=9)
  cfg = ModelConfig.for_dataset(spec, prompts=True)
  assert (cfg.bands, cfg.patch_size, cfg.prompts) == ((48, 4), 9, True)
  datasets = pytest.importorskip("dpmamba_jax.data.datasets")
  for name, p, bands, (teacher, student) in [("trento", 15, (63, 1), PINNED[0][2:]),
                                             ("houston", 11, (48, 1), PINNED[1][2:]),
                                             ("augsburg", 9, (48, 4), PINNED[2][2:])]:
    cfg = ModelConfig.for_dataset(datasets.get_spec(name))
    assert (cfg.bands, cfg.patch_size) == (bands, p), name
    res = summary.summarize(cfg)
    assert (res["teacher"]["total"], res["student"]["total"]) == (teacher, student), name


def test_config_validation_and_dict_roundtrip():
  cfg = ModelConfig.tiny()
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert hash(cfg) == hash(ModelConfig.from_dict(cfg.to_dict()))
  for bad in [dict(hidden=15), dict(heads_per_direction=3), dict(bands=()),
              dict(scan_impl="fast"), dict(af_dropout=1.0), dict(d_state=0)]:
    with pytest.raises(UserError):
      ModelConfig.tiny(**bad)
  with pytest.raises(UserError, match="unknown|not ModelConfig"):
    ModelConfig.from_dict({**cfg.to_dict(), "width": 3})


def test_summary_cli(capsys):
  assert summary.main(["--bands", "63,1", "--patch-size", "15", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["teacher"]["total"] == 147_526 and out["student"]["total"] == 176_326
  assert out["teacher"]["components"]["embed.0"] == 36_608
  assert out["teacher"]["components"]["head"] == 66_304
  assert summary.main(["--bands", "48,x", "--patch-size", "9"]) == 2
  assert "--bands" in capsys.readouterr().err


def test_summary_cli_dataset(capsys):
  pytest.importorskip("dpmamba_jax.data.datasets")
  assert summary.main(["--dataset", "houston"]) == 0
  text = capsys.readouterr().out
  assert "138,886" in text and "154,374" in text


# ------------------------------------------------------------------ init (spec §2.10)


@pytest.mark.slow
def test_init_distributions():
  cfg = ModelConfig(bands=(63, 1), patch_size=15, prompts=True)
  model = DPMamba(cfg, rngs=nnx.Rngs(1))
  blk = model.blocks[0]
  prompts = np.stack([np.asarray(p[...]) for p in model.prompts])
  assert abs(prompts.std() - 1.0) < 0.02 and abs(prompts.mean()) < 0.02
  head = np.asarray(model.head.kernel[...])
  assert abs(head.std() - 0.02) < 0.001 and not np.any(model.head.bias[...])
  conv = np.asarray(model.embed[0].conv.kernel[...])  # fan_in 63*9
  bound = 1 / np.sqrt(63 * 9)
  assert conv.shape == (3, 3, 63, 64) and np.abs(conv).max() <= bound and conv.std() > 0.5 * bound
  assert blk.conv[0].kernel.shape == (3, 3, 2, 64) and blk.cross_conv.kernel.shape == (3, 3, 1, 64)
  ssm = blk.ssm[0]
  assert np.abs(ssm.x_proj[...]).max() <= 1 / 8 and np.abs(ssm.x_proj[...]).max() > 0.1
  assert not np.any(ssm.a_log[...]) and np.all(ssm.d_skip[...] == 1)
  dt = np.asarray(ssm.dt_bias[...])
  assert dt.min() >= 0 and dt.max() < 0.1
  bn = model.embed[0].bn
  assert not np.any(bn.mean[...]) and np.all(bn.var[...] == 1) and np.all(bn.scale[...] == 1)
  assert np.all(blk.ln1[0].scale[...] == 1) and not np.any(blk.ln1[0].bias[...])


# ------------------------------------------------------------------ forward helpers


@functools.partial(jax.jit, static_argnames=("graphdef", "train"))
def _run(graphdef, state, xs, mask, key, train=False):
  """Pure forward returning (V, intermediates, new_state)."""
  model = nnx.merge(graphdef, state)
  v, inter = capture_intermediates(model, xs, mask, train=train, dropout_key=key)
  return v, inter, nnx.state(model)


def _inputs(cfg, bsz, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), cfg.num_modalities)
  p = cfg.patch_size
  return [jax.random.normal(k, (bsz, p, p, b)) + i for i, (k, b) in enumerate(zip(keys, cfg.bands))]


@pytest.fixture(scope="module")
def student():
  cfg = ModelConfig.tiny(prompts=True, depth=1)
  model = DPMamba(cfg, rngs=nnx.Rngs(0))
  # non-trivial running stats so that eval mode is not an identity BN
  for e in model.embed:
    e.bn.mean[...] = 0.1 * jnp.arange(cfg.hidden, dtype=jnp.float32) / cfg.hidden
    e.bn.var[...] = jnp.linspace(0.5, 1.5, cfg.hidden)
  return model


@pytest.mark.slow
def test_make_forward_no_retrace_and_matches_sequential(student, monkeypatch):
  cfg = student.cfg
  fwd = make_forward(student, max_traces=1)
  state = nnx.state(student)
  mask = jnp.array([[1, 1], [0, 1], [1, 0], [1, 1]], jnp.float32)
  v1 = fwd(state, _inputs(cfg, 4, 1), mask)
  v2 = fwd(state, _inputs(cfg, 4, 2), mask)  # same shapes: no retrace (max_traces=1)
  chex.assert_shape(v1, (4, cfg.out_dim))
  assert not np.allclose(v1, v2)
  # the other production scan ("auto" is "recurrent" on CPU, "associative" elsewhere)
  other = "associative" if scan.resolve_impl(cfg.scan_impl) == "recurrent" else "recurrent"
  alt = nnx.merge(nnx.graphdef(DPMamba(cfg.replace(scan_impl=other), rngs=nnx.Rngs(0))), state)
  v_alt, _, _ = _run(nnx.graphdef(alt), state, _inputs(cfg, 4, 1), mask, None)
  np.testing.assert_allclose(v_alt, v1, rtol=1e-4, atol=1e-5)

  # and the sequential lax.scan reference (tests/scan_reference.py) as the model's selective scan
  calls = []

  def reference_scan(u, x_proj, dt_bias, a_log, d_skip, paths, *, impl="auto", time_major=False):
    calls.append(impl)
    if time_major:  # (L, B, D)
      return jnp.swapaxes(selective_scan_sequential(jnp.swapaxes(u, 0, 1), x_proj, dt_bias,
                                                    a_log, d_skip, paths), 0, 1)
    return selective_scan_sequential(u, x_proj, dt_bias, a_log, d_skip, paths)

  monkeypatch.setattr(scan, "selective_scan", reference_scan)
  gd = nnx.graphdef(student)
  v_seq = jax.jit(lambda s, xs, m: nnx.merge(gd, s)(xs, m))(state, _inputs(cfg, 4, 1), mask)
  assert calls  # the forward above ran the reference
  np.testing.assert_allclose(v_seq, v1, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_eval_samples_independent_and_masks(student):
  """Eval: each row depends only on its own sample (zero SSM state, no carried state);
  a masked modality's input is ignored and replaced by the prompt."""
  cfg = student.cfg
  gd, state = nnx.split(student)
  xs = _inputs(cfg, 4, 3)
  mask = jnp.array([[1, 1], [0, 1], [1, 0], [1, 1]], jnp.float32)
  v, det, _ = _run(gd, state, xs, mask, None)
  v_again, _, _ = _run(gd, state, xs, mask, None)
  v_sub, _, _ = _run(gd, state, [x[1:3] for x in xs], mask[1:3], None)
  # change the masked-out inputs: rows 1 (modality 0) and 2 (modality 1) must not move
  xs2 = [xs[0].at[1].set(100.0), xs[1].at[2].set(-7.0)]
  v2, _, _ = _run(gd, state, xs2, mask, None)
  v_none, _, _ = _run(gd, state, xs, None, None)
  v_ones, _, _ = _run(gd, state, xs, jnp.ones((4, 2)), None)
  np.testing.assert_array_equal(v, v_again)
  np.testing.assert_allclose(v[1:3], v_sub, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v2, v, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v_ones, v_none, rtol=1e-6, atol=1e-6)
  assert not np.allclose(v[0], v_none[1], atol=1e-3)
  np.testing.assert_array_equal(det["injected/m0"][1], student.prompts[0][...])
  np.testing.assert_array_equal(det["injected/m1"][2], student.prompts[1][...])
  np.testing.assert_array_equal(det["injected/m0"][0], det["embed/m0"][0])


@pytest.mark.slow
def test_intermediates_only_when_captured(student):
  """A plain forward (eager or jitted, eval or train) sows nothing; capture_intermediates gives
  the (B, P, P, .) intermediates and leaves the model's output, state and graphdef unchanged."""
  cfg = student.cfg
  model = DPMamba(cfg, rngs=nnx.Rngs(0))
  xs, mask = _inputs(cfg, 3), jnp.array([[1, 1], [0, 1], [1, 0]], jnp.float32)
  gd, state = nnx.split(model)

  def no_intermediates(state):
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return leaves and not any(isinstance(x, nnx.Intermediate) for x in leaves)

  v = model(xs, mask)
  v_c, inter = capture_intermediates(model, xs, mask)
  np.testing.assert_array_equal(v_c, v)
  assert nnx.graphdef(model) == gd and no_intermediates(nnx.state(model))
  assert not model.sow_intermediates and not model.blocks[0].sow_intermediates
  h, blk = (3, 5, 5, cfg.hidden), "block0_detail/"
  want = {f"{k}/m{m}": h for k in ("embed_bn_relu", "embed", "injected", "block0") for m in (0, 1)}
  want.update({blk + k: h for k in ("cross_af", "cross_conv", "cross_ssm", "cross_out")})
  want.update({f"{blk}{k}/m{m}": h for k in ("af", "conv", "ssm") for m in (0, 1)})
  want["head_pooled"] = (3, 2 * cfg.hidden)
  assert {k: tuple(a.shape) for k, a in inter.items()} == want
  model(xs, mask, train=True, dropout_key=jax.random.PRNGKey(0))  # eager train: BN update
  assert nnx.graphdef(model) == gd and no_intermediates(nnx.state(model))
  _, _, new_state = _run(gd, state, xs, mask, jax.random.PRNGKey(0), train=True)  # jitted
  assert no_intermediates(new_state)
  assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


@pytest.mark.slow
def test_train_mode_batchnorm_update_and_dropout(student):
  cfg = student.cfg
  gd, state = nnx.split(student)
  params_before = nnx.state(student, nnx.Param)
  xs = _inputs(cfg, 4, 5)
  mask = jnp.array([[1, 1], [0, 1], [1, 0], [1, 1]], jnp.float32)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  va, _, new_state = _run(gd, state, xs, mask, k1, train=True)
  vb, _, _ = _run(gd, state, xs, mask, k1, train=True)
  vc, _, _ = _run(gd, state, xs, mask, k2, train=True)
  ve, _, _ = _run(gd, state, xs, mask, None)
  np.testing.assert_array_equal(va, vb)  # same key, same output
  assert not np.allclose(va, vc)  # AF dropout depends on the key
  assert not np.allclose(va, ve)
  new = nnx.merge(gd, new_state)
  assert not np.allclose(new.embed[0].bn.mean[...], student.embed[0].bn.mean[...])
  chex.assert_trees_all_equal(nnx.state(new, nnx.Param), params_before)
  with pytest.raises(ValueError, match="dropout_key"):
    student(xs, mask, train=True)
  with pytest.raises(UserError, match="modality 1"):
    student([xs[0], xs[1][..., :1]])
  with pytest.raises(UserError, match="mask"):
    student(xs, jnp.ones((4, 3)))


@pytest.mark.slow
def test_gradients_flow_and_af_bias_cancels(student):
  cfg = student.cfg
  gd, params, rest = nnx.split(student, nnx.Param, ...)
  xs = _inputs(cfg, 3, 6)

  @jax.jit
  def grads(params, mask):
    def loss(p):
      return jnp.sum(nnx.merge(gd, p, rest)(xs, mask) ** 2)
    return jax.grad(loss)(params)

  g = grads(params, jnp.array([[1, 1], [0, 1], [1, 1]], jnp.float32))
  flat = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}
  for path, arr in flat.items():
    assert np.all(np.isfinite(arr)), path
    if path == ("prompts", 1):
      continue
    if path[-2:] == ("score", "bias"):
      np.testing.assert_allclose(arr, 0.0, atol=1e-4)  # spec §2.5: the bias cancels
    else:
      assert np.abs(arr).max() > 0, path
  assert not np.any(flat[("prompts", 1)])  # modality 1 never masked -> prompt 1 unused


# ------------------------------------------------------------------ layers


def _bn_reference(x, present, mean0, var0, mom=0.1, eps=1e-5):
  sel = x[present].reshape(-1, x.shape[-1]).astype(np.float64)
  mu, var_b = sel.mean(0), sel.var(0)
  var_u = sel.var(0, ddof=1)
  y = (x - mu) / np.sqrt(var_b + eps)
  return y, (1 - mom) * mean0 + mom * mu, (1 - mom) * var0 + mom * var_u


def test_masked_batchnorm_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3, 3, 4)).astype(np.float32) * 2 + 1
  present = np.array([1, 0, 1, 1, 0], bool)
  bn = MaskedBatchNorm(4)
  bn.mean[...] = jnp.full((4,), 0.2)
  bn.var[...] = jnp.full((4,), 0.8)
  y = bn(jnp.asarray(x), jnp.asarray(present, jnp.float32), train=True)
  y_ref, m_ref, v_ref = _bn_reference(x, present, 0.2, 0.8)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(bn.mean[...], m_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], v_ref, rtol=1e-5, atol=1e-6)  # unbiased update
  # masked samples do not influence the statistics, even NaN ones
  bn2 = MaskedBatchNorm(4)
  x_nan = x.copy()
  x_nan[~present] = np.nan
  bn2.mean[...], bn2.var[...] = jnp.full((4,), 0.2), jnp.full((4,), 0.8)
  y2 = bn2(jnp.asarray(x_nan), jnp.asarray(present), train=True)
  np.testing.assert_allclose(y2[present], y[present], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(bn2.var[...], bn.var[...], rtol=1e-6)
  # mask None: every sample
  bn3 = MaskedBatchNorm(4)
  bn3(jnp.asarray(x), None, train=True)
  np.testing.assert_allclose(bn3.mean[...], 0.1 * x.reshape(-1, 4).mean(0), rtol=1e-5, atol=1e-6)
  # eval: running statistics
  y_eval = bn(jnp.asarray(x), train=False)
  np.testing.assert_allclose(y_eval, (x - m_ref) / np.sqrt(v_ref + 1e-5), rtol=1e-4, atol=1e-5)


def test_masked_batchnorm_no_sample_present():
  bn = MaskedBatchNorm(3)
  bn.mean[...], bn.var[...] = jnp.full((3,), 0.5), jnp.full((3,), 2.0)
  x = jnp.ones((2, 2, 2, 3))
  y = bn(x, jnp.zeros((2,)), train=True)
  np.testing.assert_allclose(bn.mean[...], 0.5)
  np.testing.assert_allclose(bn.var[...], 2.0)
  np.testing.assert_allclose(y, (1 - 0.5) / np.sqrt(2.0 + 1e-5), rtol=1e-6)


@pytest.mark.slow
def test_attention_fusion_weights():
  af = AttentionFusion(8, rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8))
  np.testing.assert_allclose(af([z, z]), z, rtol=1e-6, atol=1e-6)  # weights sum to 1
  z2 = z + 1.0
  w1 = jax.nn.sigmoid(af.score(z) - af.score(z2))  # n = 2: sigmoid of the score difference
  np.testing.assert_allclose(af([z, z2]), w1 * z + (1 - w1) * z2, rtol=1e-5, atol=1e-6)
  # dropout: each weight is either 0 or w / (1 - p)
  ones = jnp.ones((1, 4, 4, 8))
  out = af([ones, ones], rate=0.3, key=jax.random.PRNGKey(1))[..., 0]  # sum of kept weights
  allowed = np.array([0.0, 0.5 / 0.7, 1 / 0.7])
  assert np.all(np.isclose(np.asarray(out)[..., None], allowed, atol=1e-5).any(-1))
  assert len(np.unique(np.round(np.asarray(out), 4))) >= 2
  np.testing.assert_array_equal(af([ones, ones], rate=0.0, key=jax.random.PRNGKey(1)), ones)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["NHWC", "HWNC"])
@pytest.mark.parametrize("gpu_forms", [False, True], ids=["cpu_forms", "gpu_forms"])
@pytest.mark.parametrize("groups", [1, 4, 8])
def test_conv3x3_matches_grouped_lax_conv(groups, gpu_forms, layout, monkeypatch):
  """Conv3x3's forms of a (grouped) conv give lax.conv's values and kernel gradients.

  groups 1: a lax conv whose kernel gradient is per-tap matmuls (CPU) or an im2col matmul (GPU);
  4, 8: shifted multiply-adds whose kernel gradient is chunked dense convs (CPU) or per-tap
  reductions (GPU). gpu_forms runs the GPU forms here by listing the CPU backend for them. The
  input gradients too.
  """
  if gpu_forms:
    monkeypatch.setattr(conv_lib, "CONV_AS_MATMUL_BACKENDS", ("cpu",))
    monkeypatch.setattr(conv_lib, "FILTER_GRAD_CONV_BACKENDS", ())
  conv = conv_lib.Conv3x3(8, 8, groups, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 8))
  to_layout = (lambda a: a) if layout == "NHWC" else (lambda a: jnp.transpose(a, (1, 2, 0, 3)))
  ref = lambda k, x: jax.lax.conv_general_dilated(
      x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(conv(to_layout(x), layout),
                               to_layout(ref(conv.kernel[...], x) + conv.bias[...]), atol=1e-5)
    g_ref, gx_ref = jax.jit(jax.grad(lambda k, x: jnp.sum(jnp.sin(ref(k, x))), argnums=(0, 1)))(
        conv.kernel[...], x)
    gd, params = nnx.split(conv)
    g_mine, gx_mine = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(
        nnx.merge(gd, p)(to_layout(x), layout) - conv.bias[...])), argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(g_mine["kernel"][...], g_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(gx_mine, gx_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("p", [1, 4, 5])
def test_patch_conv_from_scene_equals_patch_conv(p):
  """Patches of the conv over a whole padded cube, corrected on the border with the ring of
  pixels around each patch, equal the conv of the zero-padded patches (scene-edge pixels too)."""
  rng = np.random.default_rng(0)
  h, w, cin = 6, 7, 5
  cube = jnp.asarray(data.pad_cubes([rng.normal(size=(h, w, cin)).astype(np.float32)], p)[0])
  conv = conv_lib.Conv3x3(cin, 8, 1, rngs=nnx.Rngs(3))
  idx = jnp.arange(h * w, dtype=jnp.int32)  # every pixel: corners and edges included
  with jax.default_matmul_precision("highest"):
    want = conv(data.gather_patches(cube, idx, w, p))
    scene_conv = conv(cube[None])[0]
    ring = data.gather_patch_rings(jnp.pad(cube, ((1, 1), (1, 1), (0, 0))), idx, w, p)
    got = conv.patch_conv_from_scene(data.gather_patches(scene_conv, idx, w, p), ring)
  chex.assert_shape(got, (h * w, p, p, 8))
  np.testing.assert_allclose(got, want, atol=2e-5)
  # the ring matters: without it the border differs
  assert np.abs(np.asarray(data.gather_patches(scene_conv, idx, w, p) - want)).max() > 1e-2
  with pytest.raises(ValueError, match="dense"):
    conv_lib.Conv3x3(4, 4, 2, rngs=nnx.Rngs(0)).patch_conv_from_scene(got, ring)


@pytest.mark.slow
@pytest.mark.parametrize("bands,prompts", [((5,), True), ((4, 2, 1), False)])
def test_other_modality_counts(bands, prompts):
  """M = 1 (no cross branch) and M = 3; the teacher puts zeros in masked slots."""
  cfg = ModelConfig.tiny(bands=bands, depth=1, prompts=prompts)
  model = DPMamba(cfg, rngs=nnx.Rngs(0))
  mask = jnp.ones((2, len(bands))).at[0, 0].set(0)
  v, det, _ = _run(*nnx.split(model), _inputs(cfg, 2), mask, None)
  chex.assert_shape(v, (2, cfg.out_dim))
  assert np.all(np.isfinite(v))
  assert hasattr(model.blocks[0], "cross_af") == (len(bands) >= 2)
  fill = model.prompts[0][...] if prompts else np.zeros_like(det["injected/m0"][0])
  np.testing.assert_array_equal(det["injected/m0"][0], fill)
  np.testing.assert_array_equal(det["injected/m0"][1], det["embed/m0"][1])


# ------------------------------------------------------------------ torch import


@pytest.mark.parametrize("cfg", [
    ModelConfig.tiny(prompts=True),
    ModelConfig.tiny(bands=(3,), depth=1, d_state=2, heads_per_direction=2),
    ModelConfig.tiny(bands=(4, 2, 1), depth=3, prompts=True, out_dim=8),
], ids=["m2", "m1_n2", "m3"])
def test_torch_roundtrip(cfg):
  model = DPMamba(cfg, rngs=nnx.Rngs(3))
  sd = torch_import.export_state_dict(model)
  assert sd["patch_embedding.0.0.weight"].shape == (cfg.hidden, cfg.bands[0], 3, 3)
  assert sd["project.head.weight"].shape == (cfg.out_dim, cfg.hidden * cfg.num_modalities)
  sd = {"teacher/" + k: v for k, v in sd.items()}
  back, cfg2 = torch_import.import_state_dict(sd, prefix="teacher/", patch_size=cfg.patch_size)
  assert cfg2 == cfg
  chex.assert_trees_all_equal(nnx.state(back), nnx.state(model))


def test_torch_import_errors():
  cfg = ModelConfig.tiny(prompts=True)
  sd = torch_import.export_state_dict(DPMamba(cfg, rngs=nnx.Rngs(0)))
  key = "Modality_Aware_Mamba.1.Conv2D.0.0.weight"
  with pytest.raises(UserError, match=f"missing key '{key}'"):
    torch_import.import_state_dict({k: v for k, v in sd.items() if k != key})
  with pytest.raises(UserError, match="unexpected key 'extra.weight'"):
    torch_import.import_state_dict({**sd, "extra.weight": np.zeros(3, np.float32)})
  bad = dict(sd)
  bad[key] = bad[key][:, :1]
  with pytest.raises(UserError, match=r"'Modality_Aware_Mamba\.1\.Conv2D\.0\.0\.weight' has "
                     r"shape \(16, 1, 3, 3\), expected \(16, 2, 3, 3\)"):
    torch_import.import_state_dict(bad)
  with pytest.raises(UserError, match="--patch-size"):
    torch_import.import_state_dict({k: v for k, v in sd.items() if "prompt" not in k})
  with pytest.raises(UserError, match="prefix"):
    torch_import.import_state_dict(sd, prefix="student/")


def test_import_tool(tmp_path, capsys):
  checkpoint = pytest.importorskip("dpmamba_jax.checkpoint")
  sys.path.insert(0, os.path.join(REPO, "tools"))
  try:
    import import_torch_checkpoint as tool
  finally:
    sys.path.pop(0)
  cfg = ModelConfig.tiny(prompts=True, depth=1)
  model = DPMamba(cfg, rngs=nnx.Rngs(5))
  sd = torch_import.export_state_dict(model)
  sd["Modality_Aware_Mamba.0.IMSM.0.initial_state"] += 1.0  # dropped, with a note
  npz = tmp_path / "weights.npz"
  np.savez(npz, **{"student/" + k: v for k, v in sd.items()})
  out = tmp_path / "ckpt"
  assert tool.main([str(npz), str(out)]) == 0
  assert "initial_state" in capsys.readouterr().err
  loaded, cfg2, meta = checkpoint.load_model(str(out))
  assert cfg2 == cfg and meta["prefix"] == "student/"
  chex.assert_trees_all_equal(nnx.state(loaded), nnx.state(model))
  assert tool.main([str(npz), str(out)]) == 2  # exists, no --overwrite
  assert tool.main([str(tmp_path / "missing.npz"), str(tmp_path / "x")]) == 2
  obj = tmp_path / "obj.npz"
  np.savez(obj, a=np.array([{"x": 1}], dtype=object))
  assert tool.main([str(obj), str(tmp_path / "y")]) == 2  # needs pickle: refused
  assert "pickle" in capsys.readouterr().err
