"""Tests for the method interface (method.py, methods.py, trainer.py): the registry, the peers'
config files, and each comparison method end to end through the shared commands (train,
evaluate, predict) on a small scene of its own."""
import json
import pathlib

import jax
import numpy as np
import pytest
import rasterio

import scene_files
from cli_errors import assert_nothing_written, assert_one_line_error, listing, run_cli
from cli_errors import private_text_cache
from dpmamba_jax import config, evaluate, masks, methods, predict, steps, train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "peers"
PEERS = ("shaspec", "dgdnet", "mshnet", "hct", "sal2rn", "crosshl")
STAGES = {"shaspec": 1, "dgdnet": 2, "mshnet": 7, "hct": 1, "sal2rn": 2, "crosshl": 1}
# the scene has 12 HSI bands: HCT's and Sal2RN's PCA (30, raw+48) scaled down to it
PEER_ARGS = {"hct": ["--set", "pca=6"], "sal2rn": ["--set", "pca=raw+4"],
             "shaspec": ["--set", "maps=true"]}  # one method's maps (the others: maps=false)
ONE_EPOCH = ["--epochs", "1", "--text-encoder", "random", "--quiet", "--set", "maps=false",
             "--set", "eval_batch=256", "--set", "batch_size=24", "--set", "train_per_class=8"]

_cache_dir = pytest.fixture(scope="module", autouse=True)(private_text_cache)


def test_registry_and_config_agree():
  assert tuple(methods.METHODS) == config.METHODS
  for name, m in methods.METHODS.items():
    assert m.name == name and m.scored


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_peer_config_files_spell_out_the_method_defaults(path):
  name, dataset = path.stem.split("_", 1)
  cfg, spec = config.resolve(config.load_config_file(str(path)), methods.defaults)
  default, _ = config.resolve({"method": name, "dataset": dataset}, methods.defaults)
  assert (cfg.method, spec.name) == (name, dataset)
  assert cfg == default, "a config file should spell out the defaults, not change them"
  assert f"--config configs/peers/{path.name}" in path.read_text()


def test_every_peer_has_configs_for_trento_and_houston():
  stems = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
  assert {f"{m}_{d}" for m in PEERS for d in ("trento", "houston")} <= stems


def test_unknown_method_is_one_line_listing_the_methods(capsys, tmp_path):
  before = listing(tmp_path)
  rc, _, err = run_cli(capsys, train.main, ["--method", "nosuch", "--workdir",
                                            str(tmp_path / "w")])
  assert_one_line_error(rc, err, "nosuch", *config.METHODS)
  assert_nothing_written(tmp_path, before)


def test_a_two_modality_method_refuses_three_before_writing(capsys, tmp_path):
  before = listing(tmp_path)
  rc, _, err = run_cli(capsys, train.main, ["--method", "shaspec", "--dataset", "augsburg3",
                                            "--workdir", str(tmp_path / "w")])
  assert_one_line_error(rc, err, "shaspec", "two modalities", "3")
  assert_nothing_written(tmp_path, before)


def test_a_patch_larger_than_the_scene_stops_before_writing(capsys, tmp_path):
  before = listing(tmp_path)
  rc, _, err = run_cli(capsys, train.main, ["--method", "shaspec", "--set", "synthetic_height=5",
                                            "--set", "synthetic_width=5", "--text-encoder",
                                            "random", "--workdir", str(tmp_path / "w")])
  assert_one_line_error(rc, err, "patch_size=7", "shaspec", "5x5")
  assert_nothing_written(tmp_path, before)


def test_peer_defaults_apply_and_flags_win():
  cfg, spec = config.resolve({"method": "dgdnet", "dataset": "houston"}, methods.defaults)
  assert (cfg.patch_size, cfg.optimizer, cfg.nesterov, cfg.batch_size) == (7, "sgd", True, 32)
  assert spec.model_bands == (144, 1)  # raw bands: their code takes no PCA
  cfg, _ = config.resolve({"method": "dgdnet", "dataset": "houston", "lr": 0.01},
                          methods.defaults)
  assert cfg.lr == 0.01
  dp, spec = config.resolve({"dataset": "houston"}, methods.defaults)
  assert dp.method == "dpmamba" and spec.model_bands == (48, 1) and dp.optimizer == "adamw"


def test_peer_cosine_schedule_per_epoch():
  """Their GradualWarmupScheduler + CosineAnnealingLR(T_max = epochs + 20), stepped per epoch:
  linear warmup over 5 epochs, then the cosine; constant within an epoch."""
  oc = steps.plain_optim_config(optimizer="sgd", lr=1e-3, weight_decay=1e-3, momentum=0.9,
                                nesterov=True, betas=(0.9, 0.999), eps=1e-8, grad_clip=0.0,
                                schedule="cosine", steps_per_epoch=4, epochs=30,
                                warmup_epochs=5, lr_min=1e-8, cosine_extra=20)
  lr = steps.lr_at(np.arange(30 * 4), oc).reshape(30, 4)
  assert (lr == lr[:, :1]).all()
  np.testing.assert_allclose(lr[:5, 0], 1e-3 * np.arange(1, 6) / 5)
  e = np.arange(5, 30)
  want = 1e-8 + 0.5 * (1e-3 - 1e-8) * (1 + np.cos(np.pi * (e - 5) / 50))
  np.testing.assert_allclose(lr[5:, 0], want, rtol=1e-12)
  tx, sched = steps.make_optimizer(oc)
  np.testing.assert_allclose([float(sched(t)) for t in (0, 19, 119)], lr.ravel()[[0, 19, 119]],
                             rtol=1e-6)


def test_random_subsets_are_uniform_over_nonempty_subsets():
  m = np.asarray(masks.random_subsets(jax.random.PRNGKey(0), 6000, 2))
  assert m.shape == (6000, 2) and (m.sum(1) >= 1).all()
  codes = (m[:, 0] + 2 * m[:, 1]).astype(int)
  counts = np.bincount(codes, minlength=4)[1:] / 6000
  np.testing.assert_allclose(counts, 1 / 3, atol=0.03)


# ----------------------------------------------------------------------------------------------
# End to end, one epoch per stage on a small scene written to GeoTIFFs.


@pytest.fixture(scope="module")
def scene_yaml(tmp_path_factory):
  return scene_files.write_scene(tmp_path_factory.mktemp("scene"), hsi_bands=12)


@pytest.fixture(scope="module", params=PEERS)
def peer_run(request, tmp_path_factory, scene_yaml, _cache_dir):
  w = tmp_path_factory.mktemp(request.param) / "run"
  assert train.main(["--method", request.param, "--dataset-file", str(scene_yaml),
                     "--workdir", str(w), *ONE_EPOCH, *PEER_ARGS.get(request.param, [])]) == 0
  return request.param, w


def _read_map(path):
  with rasterio.open(path) as f:
    return f.read(1)


@pytest.mark.slow
def test_peer_trains_evaluates_and_predicts(capsys, tmp_path, peer_run, scene_yaml):
  name, w = peer_run
  m = methods.get(name)
  metrics = json.loads((w / "metrics.json").read_text())
  assert metrics["method"] == name
  scenarios = {s for s, _ in masks.eval_scenarios(("HSI", "LiDAR"))}
  assert set(metrics[name]) == scenarios
  assert len(metrics["epochs"]) == STAGES[name]
  for stage, epochs in metrics["epochs"].items():  # every stage trained, its model saved
    assert epochs == 1 and (w / stage / "state").is_dir()
  for s in scenarios:
    assert 0.0 <= metrics[name][s]["OA"] <= 100.0
  table = (w / "metrics.md").read_text()
  assert f"| {m.title} |" in table
  # complete-input methods are scored with the missing input zero-filled, and say so
  assert (f"| {m.title} (zero-filled) |" in table) == (name in ("hct", "sal2rn", "crosshl"))
  # evaluate reproduces the run's numbers
  rc, _, err = run_cli(capsys, evaluate.main, ["--workdir", str(w)])
  assert rc == 0, err
  again = json.loads((w / "metrics.json").read_text())
  for s in scenarios:
    assert again[name][s]["confusion"] == metrics[name][s]["confusion"]
  # predict without LiDAR classifies the test pixels as the run's evaluation did
  model_dir = w / m.scored[0].needs[-1]
  rc, _, err = run_cli(capsys, predict.main, ["--model", str(model_dir), "--input",
                                              str(scene_yaml), "--missing", "LiDAR", "--out",
                                              str(tmp_path / "map.tif"), "--quiet"])
  assert rc == 0, err
  test_idx = np.load(w / "split.npz")["test_idx"]
  truth = _read_map(scene_yaml.parent / "gt.tif").ravel()[test_idx]
  predicted = _read_map(tmp_path / "map.tif").ravel()[test_idx]
  confusion = np.zeros((len(scene_files.CLASSES),) * 2, np.int64)
  np.add.at(confusion, (truth.astype(np.int64) - 1, predicted.astype(np.int64) - 1), 1)
  np.testing.assert_array_equal(confusion, metrics[name]["without:LiDAR"]["confusion"])
  if name == "shaspec":  # and equals the run's without-LiDAR map everywhere
    want = np.load(w / "maps" / f"{name}_without-LiDAR_full.npy")
    np.testing.assert_array_equal(_read_map(tmp_path / "map.tif"), want)


@pytest.mark.slow
def test_a_workdir_of_another_method_refuses_to_resume(capsys, peer_run, scene_yaml):
  name, w = peer_run
  other = "dgdnet" if name != "dgdnet" else "shaspec"
  rc, _, err = run_cli(capsys, train.main, ["--method", other, "--dataset-file",
                                            str(scene_yaml), "--workdir", str(w), *ONE_EPOCH])
  assert_one_line_error(rc, err, f"method={name!r}", f"method={other!r}")
