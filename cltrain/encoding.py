"""What an encode returns, and the sparse positions it touches: the contract between the CLT math
(train/clt.py, which defines the results) and the kernels (kernels/, which compute them faster).
A leaf module (imports nothing of the project), so that the kernels depend on nothing in train/."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakTensorKeyDictionary


def jumprelu_grad_mask(h, theta, bandwidth: float):
    """Where JumpReLU's backward reads d loss / d a: active positions and the straight-through window.
    Outside it the gradient of a is multiplied by zero, so a decode may skip computing it there."""
    return (h > theta) | ((h - theta).abs() < bandwidth / 2)


class Encoded(NamedTuple):
    pre: torch.Tensor  # [B, N, F] pre-activations h
    acts: torch.Tensor  # [B, N, F] activations a
    grad_mask: torch.Tensor | None  # [B, N, F] bool: where a decode must produce d loss / d a (None: all)
    # [N, F]: sum over tokens of relu(theta - h), the pre-activation penalty's only use of h (JumpReLU
    # only). Its gradient w.r.t. h is -1[h < theta] per feature: a dense [B, N, F] gradient that a
    # fused encode never materializes (it is a per-feature constant minus a part on grad_mask).
    preact_gap: torch.Tensor | None = None
    # [N, F]: each feature's decoder norm (CLT.decoder_norms), where a fused encode + decode computed it
    # (kernels/fused.py: its backward then folds the norms' gradient into the decoder gradient's one
    # pass over the decoder rows); None: the loss terms take CLT.decoder_norms()
    decoder_norms: torch.Tensor | None = None


def preact_gap(pre, theta):
    """[B, N, F], [N, F] -> [N, F]: sum over tokens of relu(theta - h)."""
    return torch.relu(theta - pre).sum(0)


# The non-zero activations are walked by the sparsity term and by a sparse decode, a grad_mask's
# positions by the decode's and the encode's backward: count and list each once per tensor. Keyed
# weakly by the tensor (Encoded.acts, Encoded.grad_mask), so an entry lives as long as that step's
# tensor; the tensor's version counter guards against in-place changes.
_NONZERO = WeakTensorKeyDictionary()


def nonzero_positions(t, max_density: float = 1.0):
    """(layer, token, feature) indices of the non-zeros of t [B, N, F] (activations or a mask), sorted
    in that order (the encode's [N, B, F] memory order, so the scan is contiguous); None when more
    than `max_density` of t is non-zero (listing them would cost more than dense arithmetic)."""
    entry = _NONZERO.get(t)
    if entry is None or entry[0] != t._version:
        entry = _NONZERO[t] = [t._version, int(torch.count_nonzero(t)), None]
    _, count, indices = entry
    if count > max_density * t.numel():
        return None
    if indices is None:
        indices = entry[2] = t.transpose(0, 1).nonzero(as_tuple=True)
    return indices
