"""The data layer: datasets registry, readers, splits, preprocessing, patches, sampler.

datasets.py (DatasetSpec registry), dataset_file.py (datasets defined in YAML), io.py (readers,
scene loading + validation, row-streamed ModalityReader), rasters.py (GeoTIFF / ENVI),
preprocessing.py (splits, whitened PCA, z-scores), patches.py (padding, patch gather, the
class-balanced sampler), subsets.py (single-modality runs), synthetic.py (the built-in scene);
`python -m dpmamba_jax.data` inspects a dataset.
"""
from dpmamba_jax.data.datasets import DATASETS, DatasetSpec, get_spec
from dpmamba_jax.data.io import (DATA_DIR_ENV, EXTENSIONS, LABEL_KEY, Scene, load_scene,
                                 read_array, resolve_data_dir, validate_scene)
from dpmamba_jax.data.patches import (BalancedSampler, check_patch_size, gather_patch_rings,
                                      gather_patches, pad_cubes)
from dpmamba_jax.data.preprocessing import (BandTransform, InputTransform, Split, check_split,
                                            fit_transform, labels_at, load_split, make_split,
                                            preprocess, save_split, split_from_maps,
                                            standardize, whitened_pca)
