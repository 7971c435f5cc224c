"""Every shipped config file resolves, and states the dataset's own defaults."""
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
