"""RMSNorm with a hand-written backward for the CPU (model.Decoder's norms).

torch's rms_norm on the CPU is not a kernel but a chain of elementwise ops (pow, mean, rsqrt, mul, mul), and its
autograd backward walks that chain again op by op. RMSNormFn does the same arithmetic in fewer passes over the
activations: the sum of squares as one dot product, the normalised x kept for the backward, and the backward's
three terms in two fused ops. On CUDA (where torch's fused kernel is real) and in other dtypes nn.RMSNorm runs
unchanged. tests/test_model.py checks outputs and gradients against nn.RMSNorm; docs/performance.md has the timing.
"""
import torch
import torch.nn as nn


class RMSNormFn(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dimension."""

    @staticmethod
    def forward(ctx, x, w, eps):
        r = torch.rsqrt(torch.linalg.vecdot(x, x).unsqueeze(-1) / x.shape[-1] + eps)
        xhat = x * r
        ctx.save_for_backward(xhat, w, r)
        return xhat * w

    @staticmethod
    def backward(ctx, g):
        xhat, w, r = ctx.saved_tensors
        gw = (g * xhat).reshape(-1, g.shape[-1]).sum(0)
        gxhat = g * w
        # d/dx of x * r: r * (g' - xhat * mean(g' * xhat)), with g' = g * w the gradient reaching xhat
        m = torch.linalg.vecdot(gxhat, xhat).unsqueeze(-1) / g.shape[-1]
        return torch.addcmul(gxhat, xhat, m, value=-1).mul_(r), gw, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameters and state dict); float32 on the CPU goes through RMSNormFn."""

    def forward(self, x):
        if x.is_cuda or x.dtype != torch.float32 or self.weight is None:
            return super().forward(x)
        return RMSNormFn.apply(x, self.weight, torch.finfo(x.dtype).eps if self.eps is None else self.eps)
