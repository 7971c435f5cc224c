"""Every shipped config file resolves, and states the dataset's own defaults; the maps key."""
import json
import pathlib

import pytest

from dpmamba_jax import config
from dpmamba_jax.data import datasets

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_is_a_config_per_dataset():
  assert {p.stem for p in CONFIG_FILES} == set(datasets.DATASETS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_file_resolves_to_the_dataset_defaults(path):
  cfg, spec = config.resolve(config.load_config_file(str(path)))
  default, _ = config.resolve({"dataset": cfg.dataset})
  assert spec.name == path.stem
  assert cfg == default, "a config file should spell out the defaults, not change them"
  assert f"--config configs/{path.name}" in path.read_text()  # the exact command, on top


@pytest.mark.parametrize("value, pca, keeps, model_bands", [
    ("raw", (None, None), False, (63, 1)), ("30", (30, None), False, (30, 1)),
    (30, (30, None), False, (30, 1)), ("raw+48", (48, None), True, (111, 1))])
def test_the_pca_key_sets_the_first_modalitys_inputs(value, pca, keeps, model_bands):
  cfg, spec = config.resolve({"dataset": "trento", "pca": value})
  assert (spec.pca, spec.pca_keeps_bands, spec.model_bands) == (pca, keeps, model_bands)
  assert cfg.pca == str(value)


@pytest.mark.parametrize("value, words", [
    ("raw+0", ["raw+0", "raw+N"]), ("pca", ["'pca'", "raw+N"]), ("64", ["64 PCA", "63 bands"])])
def test_a_bad_pca_value_names_what_is_expected(value, words):
  with pytest.raises(config.errors.UserError) as e:
    config.resolve({"dataset": "trento", "pca": value})
  assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("value, want", [
    ("true", True), ("false", False), ("all", "all"), ("ALL", "all"), (" All ", "all"),
    (True, True), (False, False), (0, False), ("no", False)])
def test_the_maps_key_takes_true_false_or_all(value, want, tmp_path):
  assert config.coerce("maps", value) == want and type(config.coerce("maps", value)) is type(want)
  cfg, _ = config.resolve({"maps": config.coerce("maps", value)})
  assert cfg.maps == want and type(cfg.maps) is type(want)
  # a config.json from before `all` (true / false) and one with it load alike
  path = tmp_path / "c.json"
  path.write_text(json.dumps({"maps": want}))
  assert config.load_config_file(str(path)) == {"maps": want}


@pytest.mark.parametrize("value", ["teacher", "2", "", ["all"]])
def test_a_bad_maps_value_is_one_line_naming_the_choices(value):
  with pytest.raises(config.errors.UserError) as e:
    config.coerce("maps", value, where="--set maps")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--set maps: maps=")
  assert all(w in msg for w in ("true", "false", "all")), msg
  with pytest.raises(config.errors.UserError, match=r"config maps='teacher': expected true"):
    config.resolve({"maps": "teacher"})  # not through coerce: still refused
