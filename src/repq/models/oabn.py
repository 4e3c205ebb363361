"""OABN: outlier-aware batch normalization (methods.md section 4, P2).

The folded scale t = gamma / sqrt(var + eps) of a branch's BN is what the merge writes into the deploy kernel (t0 on
the identity diagonal), so OABN bounds it while training: OABN(x) = t~ (x - mean) + beta with |t~| <= tau. Batch
statistics in training, running statistics in eval; `folded_scale()` returns t~ so the merge uses the clipped scale
and the fused conv equals the trained block exactly.

Threshold rules [choice]:
  fixed           t~ = clamp(t, -tau, tau)
  relative        per output channel tau[o] = k * max |t3 K3[o]| (the largest tap of the block's 3x3 branch, running
                  statistics), refreshed by the block at every training step and stored as a buffer
  variance_floor  the same bound reached through the normalizer: var~ = max(var, (|gamma|/tau)^2 - eps) with gamma
                  detached in the floor, so a clipped channel keeps a gradient to gamma (clamp gives it none)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.fold import bn_scale

OABN_RULES = ("fixed", "relative", "variance_floor")
OABN_BRANCHES = ("identity", "identity+1x1", "all")


@dataclass(frozen=True)
class OABNConfig:
    """Where OABN replaces BatchNorm2d in a RepVGG block and how its bound is set."""

    branches: str = "identity"   # identity | identity+1x1 | all
    rule: str = "fixed"          # fixed | relative | variance_floor
    tau: float = 1.0             # the bound of the fixed and variance_floor rules
    k: float = 1.0               # relative rule: tau = k * max |t3 K3| per output channel

    def __post_init__(self) -> None:
        if self.branches not in OABN_BRANCHES:
            raise RepqError(f"unknown OABN branches '{self.branches}'; choose one of {', '.join(OABN_BRANCHES)}")
        if self.rule not in OABN_RULES:
            raise RepqError(f"unknown OABN rule '{self.rule}'; choose one of {', '.join(OABN_RULES)}")
        if self.rule == "relative" and self.branches == "all":
            raise RepqError("the relative OABN rule bounds the identity and 1x1 branches by the 3x3 branch; "
                            "use branches 'identity' or 'identity+1x1', or the fixed/variance_floor rule")
        if not (self.tau > 0 and self.k > 0):
            raise RepqError(f"OABN tau and k must be positive (got tau={self.tau}, k={self.k})")

    @classmethod
    def parse(cls, value: bool | dict | "OABNConfig" | None) -> "OABNConfig | None":
        """`create_model(oabn=...)` takes True (defaults), a dict of fields, or an OABNConfig; False/None: off."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"branches", "rule", "tau", "k"}
            if unknown:
                raise RepqError(f"unknown OABN option(s) {', '.join(sorted(unknown))}; use branches, rule, tau, k")
            return cls(**value)
        raise RepqError(f"oabn must be True, False or a dict of options, not {type(value).__name__}")


class OutlierAwareBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose folded scale gamma / sqrt(var + eps) is bounded by `bound` (per channel)."""

    def __init__(self, num_features: int, rule: str = "fixed", tau: float = 1.0, eps: float = 1e-5,
                 momentum: float = 0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        if rule not in OABN_RULES:
            raise RepqError(f"unknown OABN rule '{rule}'; choose one of {', '.join(OABN_RULES)}")
        self.rule = rule
        # Per-channel bound; the relative rule overwrites it at every training step (see `set_bound`).
        self.register_buffer("bound", torch.full((num_features,), float(tau)))

    @torch.no_grad()
    def set_bound(self, bound: Tensor) -> None:
        self.bound.copy_(bound.detach().reshape(-1))

    def _scale(self, var: Tensor) -> Tensor:
        if self.rule == "variance_floor":
            floor = (self.weight.detach().abs() / self.bound) ** 2 - self.eps
            return self.weight / torch.sqrt(torch.maximum(var, floor) + self.eps)
        t = self.weight / torch.sqrt(var + self.eps)
        return torch.maximum(torch.minimum(t, self.bound), -self.bound)

    def folded_scale(self) -> Tensor:
        """The clipped t~ from the running statistics: what the merge writes into the deploy kernel."""
        return self._scale(self.running_var)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if self.training:
            # Batch statistics (biased variance to normalize, unbiased for the running estimate, as BatchNorm2d).
            var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), m)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        t = self._scale(var)
        return x * t.reshape(1, -1, 1, 1) + (self.bias - t * mean).reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule}"


def relative_bound(dense_kernel: Tensor, dense_bn: nn.BatchNorm2d, k: float) -> Tensor:
    """tau[o] = k * max |t3[o] K3[o]|: the largest tap of the block's folded 3x3 branch (running statistics)."""
    folded = dense_kernel.detach() * bn_scale(dense_bn).detach().reshape(-1, 1, 1, 1)
    return k * folded.abs().reshape(folded.shape[0], -1).amax(dim=1).clamp_min(1e-8)
