"""Frozen text features of the class descriptions (reference-spec §4).

texts.py: class texts, encoder choice, feature cache, `encode_texts`; clip.py, minilm.py: the two
text towers in numpy; tokenizer.py: the CLIP BPE tokenizer; `python -m dpmamba_jax.text`.
"""
from dpmamba_jax.text.texts import (ENCODERS, RandomTextEncoderWarning, TextFeatures, cache_key,
                                    class_texts, cosine_similarity, default_cache_dir,
                                    encode_texts, select_encoder)
