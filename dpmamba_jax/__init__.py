"""dpmamba_jax: a JAX/Flax reimplementation of DPMamba (IJCAI-25).

Multimodal remote-sensing classification (hyperspectral + LiDAR/SAR patches) that keeps
working when a modality is missing at inference.
"""

__version__ = "0.1.0"
