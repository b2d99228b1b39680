"""vitkit: the seed tutorial's Vision Transformer, made correct, fast and interoperable."""

from . import convert  # vitkit.convert.load / export: timm, Hugging Face, torchvision, JAX
from .checkpoint import load_pretrained, save_pretrained
from .config import VARIANTS, ViTConfig, get_config, list_models
from .layers import (
    FeedForwardBlock,
    MultiHeadAttention,
    PatchEmbedding,
    ResidualAdd,
    TransformerEncoderBlock,
)
from .model import ClassificationHead, TransformerEncoder, ViT, create_model
from .summary import summary

__version__ = "0.1.0"

__all__ = [
    "PatchEmbedding",
    "MultiHeadAttention",
    "ResidualAdd",
    "FeedForwardBlock",
    "TransformerEncoderBlock",
    "TransformerEncoder",
    "ClassificationHead",
    "ViT",
    "ViTConfig",
    "VARIANTS",
    "create_model",
    "get_config",
    "list_models",
    "summary",
    "save_pretrained",
    "load_pretrained",
    "convert",
]
