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
