"""Structural re-parameterization: BN folding, branch merging, block adapters, and `reparameterize`."""
from repq.reparam.adapters import LAYOUTS, BlockLayout, fuse_block, match_layout
from repq.reparam.fold import bn_scale, fold_bn, identity_kernel, merge_branches, pad_to
from repq.reparam.model import fuse_blocks, reparameterize

__all__ = ["LAYOUTS", "BlockLayout", "bn_scale", "fold_bn", "fuse_block", "fuse_blocks", "identity_kernel",
           "match_layout", "merge_branches", "pad_to", "reparameterize"]
