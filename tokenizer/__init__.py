"""Stage one: the straightened VQ layer and the VQGAN-style tokenizer."""
from tokenizer.group_residual import GroupVectorQuant, ResidualVectorQuant
from tokenizer.quantizer import VectorQuant

__all__ = ["VectorQuant", "GroupVectorQuant", "ResidualVectorQuant"]
