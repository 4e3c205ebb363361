"""Structural re-parameterization: BN folding, branch merging, and the model-level `reparameterize` verb."""
from repq.reparam.fold import bn_scale, fold_bn, identity_kernel, merge_branches, pad_to
from repq.reparam.model import reparameterize

__all__ = ["bn_scale", "fold_bn", "identity_kernel", "merge_branches", "pad_to", "reparameterize"]
