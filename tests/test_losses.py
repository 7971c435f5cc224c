"""Tests for dpmamba_jax.losses against plain numpy references and the golden parity values."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmamba_jax import losses

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PARITY = os.environ.get("DPMAMBA_PARITY_DIR") or os.path.join(_REPO, "..", "shared", "parity")
# Every golden set in the parity dir (trento_p15_b12.npz, and any other with the same keys).
def _has_losses(path):
  with np.load(path, allow_pickle=False) as z:
    return "loss/logit_scale" in z.files  # the forward files (not tokens.npz, not *_train.npz)


_GOLDEN = sorted(p for f in (os.listdir(_PARITY) if os.path.isdir(_PARITY) else [])
                 for p in [os.path.join(_PARITY, f)] if f.endswith(".npz") and _has_losses(p))


# ---------------------------------------------------------------------------- numpy references

def np_logits(v, z, s=12.5):
  v = v.astype(np.float64)
  z = z.astype(np.float64)
  vn = v / np.maximum(np.sqrt((v * v).sum(-1, keepdims=True)), 1e-8)
  zn = z / np.maximum(np.sqrt((z * z).sum(-1, keepdims=True)), 1e-8)
  return s * vn @ zn.T


def np_log_softmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_groups(v, labels, c):
  """Queue-based regrouping, as the authors describe it: group n row c = n-th sample of class c."""
  queues = [[v[i] for i in range(len(labels)) if labels[i] == cls] for cls in range(c)]
  k = len(queues[0])
  return [np.stack([queues[cls][n] for cls in range(c)]) for n in range(k)]


def np_ce(logits):
  lp = np_log_softmax(logits)
  return -np.mean([lp[i, i] for i in range(logits.shape[0])])


def np_clip(v, labels, z, s=12.5):
  vals = []
  for g in np_groups(v, labels, z.shape[0]):
    lg = np_logits(g, z, s)
    vals.append(0.5 * (np_ce(lg) + np_ce(lg.T)))
  return np.mean(vals)


def np_pearson(x, y):
  xc, yc = x - x.mean(), y - y.mean()
  return (xc * yc).sum() / (np.linalg.norm(xc) * np.linalg.norm(yc) + 1e-8)


def np_dist(a, b):
  pa, pb = np.exp(np_log_softmax(a)), np.exp(np_log_softmax(b))
  return 1.0 - np.mean([np_pearson(pa[i], pb[i]) for i in range(a.shape[0])])


def np_relation(v_s, v_t, labels, z, s=12.5):
  c = z.shape[0]
  vals = []
  for gs, gt in zip(np_groups(v_s, labels, c), np_groups(v_t, labels, c)):
    ss, st = np_logits(gs, z, s), np_logits(gt, z, s)
    vals.append(np_dist(ss, st) + np_dist(ss.T, st.T))
  return np.mean(vals)


def np_feature(v_s, v_t):
  return np.mean((v_t.astype(np.float64) - v_s) ** 2)


def np_kl(v_s, v_t, z, t=4.0, s=12.5):
  ys, yt = np_logits(v_s, z, s) / t, np_logits(v_t, z, s) / t
  lpt = np_log_softmax(yt)
  return np.sum(np.exp(lpt) * (lpt - np_log_softmax(ys))) * t * t / v_s.shape[0]


# ---------------------------------------------------------------------------- fixtures

def _random_batch(seed, c=5, k=3, d=16, shuffle=True):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(c), k).astype(np.int32)
  if shuffle:
    labels = rng.permutation(labels).astype(np.int32)
  v_t = rng.normal(size=(c * k, d)).astype(np.float32)
  v_s = (v_t + 0.5 * rng.normal(size=v_t.shape)).astype(np.float32)
  z = rng.normal(size=(c, d)).astype(np.float32)
  return v_s, v_t, labels, z


@pytest.fixture(scope="module", params=_GOLDEN or [None],
                ids=[os.path.basename(g) for g in _GOLDEN] or ["absent"])
def golden(request):
  if request.param is None:
    pytest.skip(f"no golden parity .npz in {_PARITY} (set DPMAMBA_PARITY_DIR)")
  with np.load(request.param) as d:
    keys = [k for k in d.files if k.startswith(("loss/", "input/labels", "input/Z_text", "output/"))]
    return {k: d[k] for k in keys}


# ---------------------------------------------------------------------------- tests

def test_cosine_logits_shape_and_reference():
  v_s, _, _, z = _random_batch(0)
  out = losses.cosine_logits(v_s, z)
  chex.assert_shape(out, (v_s.shape[0], z.shape[0]))
  np.testing.assert_allclose(out, np_logits(v_s, z), rtol=1e-5, atol=1e-6)
  # Leading batch axes broadcast.
  out3 = losses.cosine_logits(v_s.reshape(3, 5, -1), z)
  chex.assert_shape(out3, (3, 5, z.shape[0]))


def test_cosine_logits_zero_row_is_finite():
  v = np.zeros((2, 4), np.float32)
  z = np.eye(3, 4, dtype=np.float32)
  assert np.all(np.isfinite(np.asarray(losses.cosine_logits(v, z))))


def test_group_by_class_matches_queue_regrouping():
  v_s, _, labels, z = _random_batch(1)
  g = losses.group_by_class(v_s, labels, z.shape[0])
  chex.assert_shape(g, (3, 5, v_s.shape[1]))
  ref = np.stack(np_groups(v_s, labels, z.shape[0]))
  np.testing.assert_array_equal(np.asarray(g), ref)


def test_group_by_class_rejects_unbalanced():
  v = np.zeros((6, 2), np.float32)
  with pytest.raises(ValueError):
    losses.group_by_class(v, np.array([0, 0, 0, 0, 1, 1], np.int32), 2)
  with pytest.raises(ValueError):
    losses.group_by_class(v, np.array([0, 0, 0, 1, 1, 1], np.int32), 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_numpy(seed):
  v_s, v_t, labels, z = _random_batch(seed)
  np.testing.assert_allclose(losses.clip_loss(v_s, labels, z), np_clip(v_s, labels, z), rtol=1e-5)
  np.testing.assert_allclose(losses.relation_loss(v_s, v_t, labels, z),
                             np_relation(v_s, v_t, labels, z), rtol=1e-5)
  np.testing.assert_allclose(losses.feature_loss(v_s, v_t), np_feature(v_s, v_t), rtol=1e-5)
  np.testing.assert_allclose(losses.kl_distill_loss(v_s, v_t, z), np_kl(v_s, v_t, z), rtol=1e-5)
  np.testing.assert_array_equal(losses.predict(v_s, z), np.argmax(np_logits(v_s, z), -1))


def test_loss_edge_values():
  v_s, v_t, labels, z = _random_batch(3)
  # Identical student and teacher: no distillation signal at all.
  assert abs(float(losses.relation_loss(v_t, v_t, labels, z))) < 1e-5
  assert float(losses.feature_loss(v_t, v_t)) == 0.0
  assert abs(float(losses.kl_distill_loss(v_t, v_t, z))) < 1e-6
  # Features equal to their class text: CLIP loss below chance (log C).
  v_perfect = z[labels]
  assert float(losses.clip_loss(v_perfect, labels, z)) < np.log(z.shape[0])


def test_compound_losses():
  v_s, v_t, labels, z = _random_batch(4)
  loss_t, aux_t = losses.teacher_loss(v_t, labels, z)
  np.testing.assert_allclose(loss_t, np_clip(v_t, labels, z), rtol=1e-5)
  assert set(aux_t) == {"clip", "total"}
  loss, aux = losses.student_loss(v_s, v_t, labels, z)
  ref = np_clip(v_s, labels, z) + np_relation(v_s, v_t, labels, z) + np_feature(v_s, v_t)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(aux["tbd"], aux["relation"] + aux["feature"], rtol=1e-6)
  loss_kl, aux_kl = losses.student_loss(v_s, v_t, labels, z, distill="kl")
  np.testing.assert_allclose(loss_kl, np_clip(v_s, labels, z) + np_kl(v_s, v_t, z), rtol=1e-5)
  assert set(aux_kl) == {"clip", "kl", "total"}
  with pytest.raises(ValueError):
    losses.student_loss(v_s, v_t, labels, z, distill="nope")


@pytest.mark.slow
def test_student_loss_no_gradient_to_teacher():
  v_s, v_t, labels, z = _random_batch(5)
  g_t = jax.grad(lambda vt: losses.student_loss(v_s, vt, labels, z)[0])(v_t)
  assert float(jnp.abs(g_t).max()) == 0.0
  g_s = jax.grad(lambda vs: losses.student_loss(vs, v_t, labels, z)[0])(v_s)
  assert np.all(np.isfinite(np.asarray(g_s))) and float(jnp.abs(g_s).max()) > 0.0


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_student_loss_jit(self):
    v_s, v_t, labels, z = _random_batch(6)

    @self.variant
    def f(vs, vt, lab, zz):
      return losses.student_loss(vs, vt, lab, zz)

    loss, aux = f(v_s, v_t, labels, z)
    chex.assert_shape(loss, ())
    ref = np_clip(v_s, labels, z) + np_relation(v_s, v_t, labels, z) + np_feature(v_s, v_t)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(aux["clip"], np_clip(v_s, labels, z), rtol=1e-5)

  def test_traces_once(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(vs, vt, lab, zz):
      return losses.student_loss(vs, vt, lab, zz)[0]

    for seed in range(3):
      f(*_random_batch(seed))


# ---------------------------------------------------------------------------- golden parity

@pytest.mark.slow
def test_golden_losses(golden):
  d = golden
  s = float(d["loss/logit_scale"])
  labels, z = d["input/labels"], d["input/Z_text"]
  v_t, v_s = d["output/V_teacher"], d["output/V_student_mask_cycle"]
  atol = 1e-6
  np.testing.assert_allclose(losses.clip_loss(v_t, labels, z, scale=s), d["loss/clip_teacher"], rtol=0, atol=atol)
  np.testing.assert_allclose(losses.clip_loss(v_s, labels, z, scale=s), d["loss/clip_all"], rtol=0, atol=atol)
  np.testing.assert_allclose(losses.relation_loss(v_s, v_t, labels, z, scale=s),
                             d["loss/class_relation_kd"], rtol=0, atol=atol)
  np.testing.assert_allclose(losses.feature_loss(v_s, v_t), d["loss/features_kd"], rtol=0, atol=atol)
  total, aux = losses.student_loss(v_s, v_t, labels, z, scale=s)
  np.testing.assert_allclose(total, d["loss/total"], rtol=0, atol=atol)
  np.testing.assert_allclose(aux["clip"], d["loss/clip_all"], rtol=0, atol=atol)
  np.testing.assert_allclose(losses.kl_distill_loss(v_s, v_t, z, 4.0, scale=s),
                             d["loss/distill_kl_T4"], rtol=0, atol=atol)
  t_loss, _ = losses.teacher_loss(v_t, labels, z, scale=s)
  np.testing.assert_allclose(t_loss, d["loss/clip_teacher"], rtol=0, atol=atol)


def test_golden_logits_and_predictions(golden):
  d = golden
  s = float(d["loss/logit_scale"])
  z = d["input/Z_text"]
  np.testing.assert_allclose(losses.cosine_logits(d["output/V_teacher"], z, s), d["output/logits_teacher"],
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(losses.cosine_logits(d["output/V_student_mask_cycle"], z, s),
                             d["output/logits_student_mask_cycle"], rtol=0, atol=1e-5)
  for name in ("teacher", "student_complete", "student_mask_cycle", "student_mask_miss_m0",
               "student_mask_miss_m1"):
    np.testing.assert_array_equal(losses.predict(d[f"output/V_{name}"], z), d[f"output/pred_{name}"])


def test_golden_labels_are_class_sorted(golden):
  labels = golden["input/labels"]
  c = golden["input/Z_text"].shape[0]
  g = losses.group_by_class(golden["output/V_teacher"], labels, c)
  k = labels.shape[0] // c
  chex.assert_shape(g, (k, c, golden["output/V_teacher"].shape[1]))
  # Class-sorted labels: group n row c is V[c * k + n].
  n, cls = k - 1, c - 1
  np.testing.assert_array_equal(np.asarray(g[n, cls]), golden["output/V_teacher"][cls * k + n])
