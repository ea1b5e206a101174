"""cltrain: train cross-layer transcoders. Code lives in cltrain.train (model, data, loop), cltrain.kernels
(Triton kernels and their PyTorch twins) and cltrain.configs (the Hydra config tree)."""
__version__ = "0.1.0"
