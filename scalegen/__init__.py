"""scalegen: train every major family of deep generative model from a recipe."""

__version__ = "0.1.0"
