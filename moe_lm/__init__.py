"""moe-lm: small Mixture-of-Experts language models (Shazeer et al. 2017) on a laptop or one GPU."""

__version__ = "0.1.0"
