"""Stage one: the straightened VQ layer and the VQGAN-style tokenizer."""
from tokenizer.group_residual import GroupVectorQuant, ResidualVectorQuant
from tokenizer.quantizer import VectorQuant

__all__ = ["VectorQuant", "GroupVectorQuant", "ResidualVectorQuant"]
from tokenizer.autoencoder import VQModel, load_tokenizer
from tokenizer.config import PRESETS, VQ_VARIANTS, TokenizerConfig, VQConfig, build_quantizer, preset

__all__ += ["VQModel", "load_tokenizer", "PRESETS", "VQ_VARIANTS", "TokenizerConfig", "VQConfig", "build_quantizer", "preset"]
