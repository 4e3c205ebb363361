"""Structural re-parameterization: BN folding, branch merging, block adapters, and `reparameterize`."""
from repq.reparam.adapters import LAYOUTS, BlockLayout, fuse_block, match_layout
from repq.reparam.fold import bn_scale, fold_bn, identity_kernel, merge_branches, pad_to
from repq.reparam.convbn import fold_conv_bn
from repq.reparam.model import fuse_blocks, fused_blocks, reparameterize
from repq.reparam.verify import verify_fusion

__all__ = ["LAYOUTS", "BlockLayout", "bn_scale", "fold_bn", "fold_conv_bn", "fuse_block", "fuse_blocks", "fused_blocks", "identity_kernel",
           "match_layout", "merge_branches", "pad_to", "reparameterize", "verify_fusion"]
