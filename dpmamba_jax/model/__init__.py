"""The DPMamba network.

network.py (ModelConfig, DPMamba, make_forward), blocks.py (the layers and the modality-aware
Mamba block), conv.py (3x3 convs and their backend forms), scan.py (zigzag paths and the
selective scan), ablations.py (the modules of the ablation variants), torch_import.py (the
authors' PyTorch weights).
"""
from dpmamba_jax.model.network import (DPMamba, ModelConfig, abstract_model, make_forward,
                                       param_count)
