"""dalle-train: the command line that trains DiscreteVAE, DALLE and CLIP and generates images."""

__version__ = "0.1.0"
