"""HyperIQA and its backbones."""
from .backbones import BACKBONES, Backbone
from .hyperiqa import HyperIQA, create_model

MODEL_SIZES: tuple[str, ...] = tuple(BACKBONES)

__all__ = ["MODEL_SIZES", "Backbone", "HyperIQA", "create_model"]
