"""INT4 quantization-aware training: group-wise fake quantization with a straight-through estimator.

The forward pass replaces a weight by ``dequantize(quantize(w))`` — symmetric INT4, groups of ``group_size``
columns along K, fp16 scales ``absmax/7`` — using :func:`sparsert.runtime.int4.fake_quantize_int4`, the same
function the compressor's numerics are defined by, so the model trains on exactly the values the compressed
artifact will hold. The backward pass is the straight-through estimator (Bengio, Léonard & Courville 2013,
"Estimating or Propagating Gradients Through Stochastic Neurons"; as used for QAT by Jacob et al., CVPR 2018):
the gradient passes through the rounding unchanged.

For a 2:4 layer the quantizer is applied to the kept values ``W ⊙ mask``; the pruned zeros quantize to code 0
and a group of ``group_size`` original columns holds ``group_size/2`` kept values, as in the artifact.
"""

from __future__ import annotations

import torch

from sparsert.runtime.int4 import fake_quantize_int4

DEFAULT_GROUP_SIZE = 128


class FakeQuantInt4STE(torch.autograd.Function):
    """``w [out, K] float -> fake_quantize_int4(w, group_size) [out, K]``, gradient passed straight through."""

    @staticmethod
    def forward(ctx, weight, group_size, name):  # noqa: ANN001 - autograd signature
        return fake_quantize_int4(weight, group_size, name=name)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        return grad_out, None, None


def fake_quant_int4_ste(
    weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, name: str = "weight"
) -> torch.Tensor:
    """Fake-quantize ``weight`` [out, K] (K % group_size == 0) to INT4 with a straight-through gradient.

    Returns float [out, K] in ``weight``'s dtype; FormatError (naming ``name``) when the group size does not
    divide K.
    """
    return FakeQuantInt4STE.apply(weight, group_size, name)
