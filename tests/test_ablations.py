"""Ablation switches (model/ablations.py, data/subsets.py) and tools/report.py (issue 7)."""
import importlib.util
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpmamba_jax import config as config_lib
from dpmamba_jax import checkpoint, errors, run, train
from dpmamba_jax.data import datasets
from dpmamba_jax.model import ablations
from dpmamba_jax.model import DPMamba, ModelConfig, abstract_model, param_count
from dpmamba_jax.model.network import capture_intermediates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(cfg, b=4, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), cfg.num_modalities)
  return [jax.random.normal(k, (b, cfg.patch_size, cfg.patch_size, c))
          for k, c in zip(keys, cfg.bands)]


SWITCHES = [dict(backbone="vit"), dict(fusion="add"),
            dict(mixer="dwconv", fusion="add", bands=(6,)), dict(backbone="vit", bands=(6,))]


@pytest.mark.slow
@pytest.mark.parametrize("kw", SWITCHES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_switch_forward_shapes(kw):
  cfg = ModelConfig.tiny(depth=1, prompts=True, **kw)
  model = DPMamba(cfg, rngs=nnx.Rngs(0))
  xs = _inputs(cfg)
  mask = np.ones((4, cfg.num_modalities), np.float32)
  if cfg.num_modalities > 1:
    mask[1, 0] = mask[2, -1] = 0
  graphdef, state = nnx.split(model)

  @jax.jit
  def train_forward(state, xs, mask, key):
    return nnx.merge(graphdef, state)(xs, mask, train=True, dropout_key=key)

  v_train = train_forward(state, xs, jnp.asarray(mask), jax.random.PRNGKey(1))
  chex.assert_shape(v_train, (4, cfg.out_dim))
  chex.assert_tree_all_finite(v_train)


def test_default_switches_are_the_method():
  cfg = ModelConfig.for_dataset("trento")
  assert (cfg.backbone, cfg.fusion, cfg.mixer) == ("mamba", "af", "mism")
  run, _ = config_lib.resolve({"dataset": "trento"})
  assert (run.backbone, run.fusion, run.mixer, run.prompts, run.modalities, run.distill) == (
      "mamba", "af", "mism", True, None, "tbd")
  assert config_lib.model_config(run, datasets.get_spec("trento"), 512) == cfg.replace(out_dim=512)


def _block_params(cfg):
  return param_count(abstract_model(cfg)) - param_count(abstract_model(cfg.replace(depth=0)))


def test_vit_param_count_pinned_and_comparable():
  cfg = ModelConfig.for_dataset("trento")  # h 64, M 2, depth 2, P 15
  mamba, vit_n = _block_params(cfg), _block_params(cfg.replace(backbone="vit"))
  assert mamba == 43_718
  assert vit_n == 42_432
  h, m = 64, 2
  per_layer = 4 * (h * h + h) + (h * h // 2 + h // 2) + (h // 2 * h + h) + 2 * 2 * h + m * h
  assert vit_n == 2 * per_layer
  assert abs(vit_n / mamba - 1) < 0.10


def test_fusion_add_and_dwconv_change_counts_as_expected():
  cfg = ModelConfig.for_dataset("trento")
  base = param_count(abstract_model(cfg))
  h, m, depth = cfg.hidden, cfg.num_modalities, cfg.depth
  # AF = a 1x1 score conv (h weights + 1 bias); M per-modality AFs plus the cross AF per block.
  assert param_count(abstract_model(cfg.replace(fusion="add"))) == base - depth * (m + 1) * (h + 1)
  # ZigzagSSM: x_proj 4 h (R + 2N), dt_bias 4R, A_log 4R, D 4h; the DW conv: 9h + h.
  r, n = cfg.heads_per_direction, cfg.d_state
  ssm = 4 * h * (r + 2 * n) + 4 * r + 4 * r + 4 * h
  assert param_count(abstract_model(cfg.replace(mixer="dwconv"))) == (
      base - depth * (m + 1) * (ssm - 10 * h))


@pytest.mark.slow
def test_add_fusion_and_dwconv_numerics():
  zs = [jax.random.normal(jax.random.PRNGKey(i), (2, 3, 3, 4)) for i in range(3)]
  out = ablations.AddFusion()(zs, rate=0.3, key=jax.random.PRNGKey(0))
  chex.assert_trees_all_close(out, zs[0] + zs[1] + zs[2], atol=1e-6)
  mixer = ablations.DWConvMixer(4, rngs=nnx.Rngs(0))
  x = np.asarray(zs[0])
  k = np.asarray(mixer.conv.kernel[...])  # (3, 3, 1, 4)
  assert k.shape == (3, 3, 1, 4)
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ref = np.zeros_like(x) + np.asarray(mixer.conv.bias[...])
  for dy in range(3):
    for dx in range(3):
      ref += xp[:, dy:dy + 3, dx:dx + 3, :] * k[dy, dx, 0]
  chex.assert_trees_all_close(mixer(zs[0], impl="auto"), ref, atol=1e-5)


def _np_layer_norm(x, ln):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * np.asarray(ln.scale[...]) + np.asarray(ln.bias[...])


def _np_linear(x, lin):
  return x @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])


@pytest.mark.slow
def test_vit_block_matches_numpy_reference():
  from scipy.special import erf
  cfg = ModelConfig.tiny(bands=(3, 2), patch_size=3, hidden=8, heads_per_direction=2,
                         backbone="vit")
  blk = ablations.ViTBlock(cfg, rngs=nnx.Rngs(3))
  blk.modality_embed[...] = jax.random.normal(jax.random.PRNGKey(5), (2, 8))
  fs = [jax.random.normal(jax.random.PRNGKey(i), (2, 3, 3, 8)) for i in range(2)]
  out = blk(fs)
  x = np.concatenate([np.asarray(f).reshape(2, 9, 8) for f in fs], axis=1)  # (B, 18, 8)
  pos = ablations.sincos_2d(3, 8)
  emb = np.concatenate([pos + np.asarray(blk.modality_embed[...])[m] for m in range(2)])
  y = _np_layer_norm(x, blk.ln1)
  q, k, v = _np_linear(y + emb, blk.q), _np_linear(y + emb, blk.k), _np_linear(y, blk.v)
  heads = []
  for r in range(2):
    sl = slice(4 * r, 4 * r + 4)
    logits = np.einsum("btd,bsd->bts", q[..., sl], k[..., sl]) / 2.0
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    heads.append(np.einsum("bts,bsd->btd", w, v[..., sl]))
  x = x + _np_linear(np.concatenate(heads, -1), blk.o)
  hid = _np_linear(_np_layer_norm(x, blk.ln2), blk.fc1)
  x = x + _np_linear(0.5 * hid * (1 + erf(hid / np.sqrt(2))), blk.fc2)
  for m in range(2):
    chex.assert_trees_all_close(out[m], x[:, 9 * m:9 * (m + 1)].reshape(2, 3, 3, 8), atol=1e-5)


def test_sincos_embedding_distinguishes_positions():
  e = ablations.sincos_2d(5, 10)
  assert e.shape == (25, 10)
  assert len({tuple(np.round(r, 6)) for r in e}) == 25


@pytest.mark.slow
def test_student_without_prompts_zero_fills():
  cfg = ModelConfig.tiny(depth=0, prompts=False)  # only the injection is looked at
  student = DPMamba(cfg, rngs=nnx.Rngs(0))  # what train.py builds with prompts=false
  assert not hasattr(student, "prompts")
  assert param_count(student) == param_count(DPMamba(cfg.replace(prompts=True),
                                                     rngs=nnx.Rngs(0))) - 2 * 5 * 5 * 16
  _, det = capture_intermediates(student, _inputs(cfg, 3),
                                 jnp.asarray([[1, 1], [0, 1], [1, 0]], jnp.float32))
  assert not np.any(det["injected/m0"][1]) and not np.any(det["injected/m1"][2])
  assert np.any(det["injected/m0"][0])


def test_modalities_restrict_spec_and_errors():
  cfg, spec = config_lib.resolve({"dataset": "augsburg3", "modalities": "sar"})
  assert cfg.modalities == "SAR" and spec.modalities == ("SAR",) and spec.bands == (4,)
  assert spec.model_bands == (4,) and spec.class_names == datasets.get_spec("augsburg").class_names
  cfg, spec = config_lib.resolve({"dataset": "augsburg3", "modalities": "LiDAR,HSI"})
  assert cfg.modalities == "HSI,LiDAR" and spec.model_bands == (48, 1)
  cfg, spec = config_lib.resolve({"dataset": "trento", "modalities": "HSI,LiDAR"})
  assert cfg.modalities is None and spec is datasets.get_spec("trento")
  with pytest.raises(errors.UserError, match="modalities='SAR'.*HSI,LiDAR"):
    config_lib.resolve({"dataset": "trento", "modalities": "SAR"})
  for key, val in (("backbone", "cnn"), ("fusion", "mul"), ("mixer", "attn")):
    with pytest.raises(errors.UserError, match=f"config {key}='{val}'"):
      config_lib.resolve({key: val})
  with pytest.raises(errors.UserError, match="prompts='maybe'"):
    config_lib.parse_sets(["prompts=maybe"])


def test_restricted_synthetic_scene_loads():
  cfg, spec = config_lib.resolve({"modalities": "LiDAR", "synthetic_height": 24,
                                  "synthetic_width": 20})
  scene = run._load_scene(cfg, spec)
  assert scene.spec.modalities == ("LiDAR",) and len(scene.cubes) == 1
  assert scene.cubes[0].shape == (24, 20, 1)
  full = run._load_scene(config_lib.resolve({"synthetic_height": 24,
                                             "synthetic_width": 20})[0], datasets.get_spec(
                                                 "synthetic"))
  np.testing.assert_array_equal(scene.cubes[0], full.cubes[1])
  np.testing.assert_array_equal(scene.labels, full.labels)


TINY = ["--epochs", "1", "--text-encoder", "random", "--quiet",
        "--set", "model=tiny", "--set", "depth=0", "--set", "hidden=8", "--set", "patch_size=3",
        "--set", "synthetic_height=40", "--set", "synthetic_width=40",
        "--set", "train_per_class=8", "--set", "batch_size=24", "--set", "eval_batch=256",
        "--set", "maps=false"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_end_to_end_variant3_kl_through_train_main(tmp_path, capsys):
  wd = tmp_path / "v3"
  assert train.main(["--workdir", str(wd), *TINY, "--set", "prompts=false",
                     "--set", "distill=kl"]) == 0
  err = capsys.readouterr().err  # --quiet: no progress bars for the stages or the evaluation
  assert "epoch/s" not in err and "eval student" not in err and "batch/s" not in err, err[-500:]
  m = json.loads((wd / "metrics.json").read_text())
  assert set(m["student"]) == {"complete", "without:HSI", "without:LiDAR"}
  assert m["epochs"] == {"pretrain": 1, "distill": 1}
  student, scfg, _ = checkpoint.load_model(str(wd / "student"))
  assert scfg.prompts is False and not hasattr(student, "prompts")
  log = [json.loads(l) for l in (wd / "log.jsonl").read_text().splitlines()]
  distill = [e for e in log if e["stage"] == "distill"][0]
  assert "kl" in " ".join(distill) and "tbd" not in " ".join(distill)
  saved = json.loads((wd / "config.json").read_text())
  assert saved["prompts"] is False and saved["distill"] == "kl"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_end_to_end_single_modality_net(tmp_path):
  wd = tmp_path / "lidar"
  assert train.main(["--workdir", str(wd), *TINY, "--set", "modalities=LiDAR"]) == 0
  m = json.loads((wd / "metrics.json").read_text())
  assert m["student"] == {} and list(m["teacher"]) == ["complete"]
  assert m["epochs"] == {"pretrain": 1, "distill": 0}
  assert not (wd / "student").exists()
  _, tcfg, _ = checkpoint.load_model(str(wd / "teacher"))
  assert tcfg.bands == (1,)


# ----------------------------------------------------------------------------------------------
# tools/report.py


def _report():
  spec = importlib.util.spec_from_file_location("report", os.path.join(REPO, "tools",
                                                                       "report.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _fake_metrics(seed, oa_student, oa_teacher, epochs=20):
  def s(oa):
    return {"OA": oa, "AA": oa - 1, "kappa": oa - 2, "per_class": [], "confusion": []}
  return {"dataset": "trento", "seed": seed, "text_encoder": "minilm",
          "epochs": {"pretrain": epochs, "distill": epochs},
          "student": {"complete": s(oa_student), "without:HSI": s(oa_student - 10),
                      "without:LiDAR": s(oa_student - 1)},
          "teacher": {"complete": s(oa_teacher), "without:HSI": s(oa_teacher - 40),
                      "without:LiDAR": s(oa_teacher - 20)},
          "wall_time_s": {}}


def test_report_tables_from_fake_runs(tmp_path, capsys):
  report = _report()
  for seed, (st, te) in enumerate(((90.0, 91.0), (94.0, 93.0))):
    wd = tmp_path / "trento" / "dpmamba" / f"seed{seed}"
    wd.mkdir(parents=True)
    (wd / "metrics.json").write_text(json.dumps(_fake_metrics(seed, st, te)))
  one = tmp_path / "trento" / "variant1" / "seed1"
  one.mkdir(parents=True)
  (one / "metrics.json").write_text(json.dumps(_fake_metrics(1, 80.0, 93.0)))
  out = tmp_path / "r.md"
  assert report.main(["--runs-root", str(tmp_path), "--seeds", "0", "1",
                      "--out", str(out)]) == 0
  text = out.read_text()
  # DPMamba complete OA over seeds: 90, 94 -> 92.00 ± 2.83 (sample std).
  assert "| DPMamba (ours) | HSI, LiDAR | HSI, LiDAR | 92.00 ± 2.83 | 91.00 ± 2.83 | " \
         "90.00 ± 2.83 |" in text
  # Baseline w/o HSI = teacher: 51, 53 -> 52.00 ± 1.41.
  assert "| Baseline (teacher, zero-filled) | HSI, LiDAR | LiDAR | 52.00 ± 1.41 |" in text
  assert "| Baseline (teacher, zero-filled) | HSI,LiDAR | LiDAR | 52.00 ± 1.41 |" in text
  # Table 3: Variant-1 has one of two seeds; W/o LiDAR first (79), then W/o HSI (70).
  assert "| trento | Variant-1 (TBD replaced) | 79.00 (n=1) | 78.00 (n=1) | " \
         "77.00 (n=1) | 70.00 (n=1) |" in text
  assert "|  | Variant-2a (Backbone replaced) | — | — | — |" in text
  assert "| HSI-Net | HSI | HSI | — | — | — |" in text
  assert "shortened schedule, 20 epochs per stage (the default for trento: 500)" in text
  assert "trento/hsi-net (0/2 seeds)" in text and "sar-net" not in text
  assert "92.00 ± 2.83" in capsys.readouterr().out


def test_report_train_command_and_errors(tmp_path):
  report = _report()
  (tmp_path / "trento" / "dpmamba" / "seed0" / "teacher").mkdir(parents=True)
  cmd = report.train_command(str(tmp_path), "trento", "variant3", 0, epochs=5, data_dir="/d")
  assert cmd[1:3] == ["-m", "dpmamba_jax.train"]
  joined = " ".join(cmd)
  assert "--set prompts=false" in joined and "--epochs 5" in joined and "--data-dir /d" in joined
  assert "--stage distill --teacher-ckpt" in joined and "--set maps=false" in joined
  cmd = report.train_command(str(tmp_path), "trento", "variant2a", 0)
  assert "--set backbone=vit" in " ".join(cmd) and "--stage" not in cmd
  assert report.applicable("lidar-net", datasets.get_spec("trento"))
  assert not report.applicable("sar-net", datasets.get_spec("trento"))
  assert report.main(["--runs-root", str(tmp_path / "nothing")]) == 2


def test_report_table1_with_the_comparison_methods(tmp_path):
  """--table1: the peers' rows under their scenario groups, the fusion methods zero-filled as
  extra lines, a peer's cells from its own metrics key; a peer that cannot take a dataset is
  not run (two-modality methods on augsburg3)."""
  report = _report()

  def peer(key, oa, epochs):
    s = {"OA": oa, "AA": oa - 1, "kappa": oa - 2, "per_class": [], "confusion": []}
    return {"dataset": "trento", "seed": 0, "method": key, "epochs": epochs,
            key: {"complete": s, "without:HSI": dict(s, OA=oa - 30),
                  "without:LiDAR": dict(s, OA=oa - 5)}, "wall_time_s": {}}
  runs = {"dpmamba": _fake_metrics(0, 90.0, 91.0),
          "shaspec": peer("shaspec", 95.0, {"model": 7}),
          "hct": peer("hct", 97.0, {"model": 9}),
          "hct-dropout": peer("hct", 93.0, {"model": 9})}
  for variant, m in runs.items():
    wd = tmp_path / "trento" / variant / "seed0"
    wd.mkdir(parents=True)
    (wd / "metrics.json").write_text(json.dumps(m))
  out = tmp_path / "r.md"
  assert report.main(["--runs-root", str(tmp_path), "--seeds", "0", "--table1",
                      "--out", str(out)]) == 0
  text = out.read_text()
  rows = [l for l in text.splitlines() if l.startswith("| ")]
  w_o_hsi = rows.index(next(r for r in rows if "W/o HSI" in r))
  group = rows[w_o_hsi + 1:w_o_hsi + 9]
  assert [r.split(" | ")[0][2:] for r in group] == [
      "Baseline (teacher, zero-filled)", "ShaSpec", "DGDNet", "MSH-Net", "DPMamba (ours)",
      "HCT (zero-filled)", "Sal2RN (zero-filled)", "Cross-HL (zero-filled)"]
  assert "| ShaSpec | HSI, LiDAR | LiDAR | 65.00 |" in text
  assert "| HCT (zero-filled) | HSI, LiDAR | LiDAR | 67.00 |" in text
  assert "| HCT + modality dropout (zero-filled) | HSI, LiDAR | LiDAR | 63.00 |" in text
  assert "| HCT | HSI, LiDAR | HSI, LiDAR | 97.00 |" in text
  assert "ShaSpec 7; HCT 9; HCT + modality dropout 9" in text
  assert report.applicable("mshnet", datasets.get_spec("augsburg3"))
  assert not report.applicable("shaspec", datasets.get_spec("augsburg3"))
  cmd = " ".join(report.train_command(str(tmp_path), "trento", "crosshl-dropout", 0, epochs=2))
  assert "--set method=crosshl --set modality_dropout=true" in cmd and "--epochs 2" in cmd
  assert report.main(["--runs-root", str(tmp_path), "--table1", "--variants", "hct"]) == 2
