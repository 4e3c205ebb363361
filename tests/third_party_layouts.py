"""Third-party re-parameterized layouts, reproduced with their projects' attribute names, forward rules and own
deploy methods (the projects are not installed): DingXiaoH/RepVGG (`repvgg.py`, `repvggplus.py`, `se_block.py`),
meituan/YOLOv6 (`yolov6/layers/common.py`: RepVGGBlock, QARepVGGBlockV2, SimConv, RepBlock, SimSPPF, EfficientRep,
Rep-PAN neck, decoupled head, `fuse_model`), and timm 1.0 (`byobnet.py` MobileOneBlock with `attn`, `SEModule`).
Used by tests/test_third_party.py and benchmarks/fusion_benchmark.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k, stride, padding, groups=1):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


def _fold(kernel, bn):
    t = bn.weight / (bn.running_var + bn.eps).sqrt()
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def _eye(channels, groups, k=3):
    d = channels // groups
    kernel = torch.zeros(channels, d, k, k)
    for i in range(channels):
        kernel[i, i % d, k // 2, k // 2] = 1
    return kernel


def _three_branches(dense, one, identity, channels):
    """The original RepVGG merge (its get_equivalent_kernel_bias), written independently of repq's."""
    k3, b3 = _fold(dense.conv.weight, dense.bn)
    k1, b1 = _fold(one.conv.weight, one.bn)
    kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
    if identity is not None:
        ki, bi = _fold(_eye(channels, 1), identity)
        kernel, bias = kernel + ki, bias + bi
    return kernel, bias


# --- DingXiaoH/RepVGG: se_block.py, repvgg.py, repvggplus.py ---------------------------------------------------

class SEBlock(nn.Module):
    def __init__(self, input_channels, internal_neurons):
        super().__init__()
        self.down = nn.Conv2d(input_channels, internal_neurons, 1, 1, bias=True)
        self.up = nn.Conv2d(internal_neurons, input_channels, 1, 1, bias=True)
        self.input_channels = input_channels

    def forward(self, inputs):
        x = F.avg_pool2d(inputs, kernel_size=inputs.size(3))
        x = torch.sigmoid(self.up(F.relu(self.down(x))))
        x = x.view(-1, self.input_channels, 1, 1)
        return inputs * x


class RepVGGplusBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, use_post_se=False, own_deploy=True):
        super().__init__()
        self.deploy, self.in_channels = False, cin
        self.nonlinearity = nn.ReLU()
        self.post_se = SEBlock(cout, cout // 4) if use_post_se else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0)
        if not own_deploy:   # a variant without switch_to_deploy: repq cannot know what to do with post_se
            self.switch_to_deploy = None

    def forward(self, x, L2):
        if self.deploy:
            return self.post_se(self.nonlinearity(self.rbr_reparam(x))), None
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(x)
        out = self.post_se(self.nonlinearity(self.rbr_dense(x) + self.rbr_1x1(x) + id_out))
        # the custom L2 of RepVGGplus: it reads the BN parameters outside their modules
        t3 = (self.rbr_dense.bn.weight / (self.rbr_dense.bn.running_var + self.rbr_dense.bn.eps).sqrt())
        t1 = (self.rbr_1x1.bn.weight / (self.rbr_1x1.bn.running_var + self.rbr_1x1.bn.eps).sqrt())
        t3, t1 = t3.reshape(-1, 1, 1, 1).detach(), t1.reshape(-1, 1, 1, 1).detach()
        K3, K1 = self.rbr_dense.conv.weight, self.rbr_1x1.conv.weight
        eq_kernel = K3[:, :, 1:2, 1:2] * t3 + K1 * t1
        l2 = (K3 ** 2).sum() - (K3[:, :, 1:2, 1:2] ** 2).sum() + (eq_kernel ** 2 / (t3 ** 2 + t1 ** 2)).sum()
        return out, L2 + l2

    def get_equivalent_kernel_bias(self):
        return _three_branches(self.rbr_dense, self.rbr_1x1, self.rbr_identity, self.in_channels)

    def switch_to_deploy(self):
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel.detach(), bias.detach()
        del self.rbr_dense, self.rbr_1x1
        if hasattr(self, "rbr_identity"):
            del self.rbr_identity
        self.deploy = True


class RepVGGplusStage(nn.Module):
    def __init__(self, cin, cout, n, stride, use_post_se):
        super().__init__()
        self.blocks = nn.ModuleList([RepVGGplusBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1,
                                                     use_post_se) for i in range(n)])

    def forward(self, x, L2):
        for block in self.blocks:
            x, L2 = block(x, L2)
        return x, L2


class RepVGGplus(nn.Module):
    """stage0, one stage, an auxiliary classifier, `y.view(y.size(0), -1)`; train form returns a dict."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.deploy = False
        self.stage0 = RepVGGplusBlock(1, width, 1, use_post_se=True)
        self.stage1 = RepVGGplusStage(width, 2 * width, 2, 2, use_post_se=True)
        self.stage1_aux = nn.Sequential(conv_bn(2 * width, 2 * width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten(), nn.Linear(2 * width, num_classes))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out, L2 = self.stage0(x, L2=0.0)
        out, L2 = self.stage1(out, L2=L2)
        aux = self.stage1_aux(out)
        y = self.gap(out)
        y = y.view(y.size(0), -1)
        return {"main": self.linear(y), "stage1_aux": aux, "L2": L2}


class OriginalRepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, use_se=False):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = SEBlock(cout, max(1, cout // 16)) if use_se else nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense, self.rbr_1x1 = conv_bn(cin, cout, 3, stride, 1), conv_bn(cin, cout, 1, stride, 0)

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class OriginalRepVGG(nn.Module):
    def __init__(self, num_classes=10, width=8, use_se=True):
        super().__init__()
        self.stage0 = OriginalRepVGGBlock(1, width, 1, use_se)
        self.stage1 = nn.Sequential(OriginalRepVGGBlock(width, 2 * width, 2, use_se),
                                    OriginalRepVGGBlock(2 * width, 2 * width, 1, use_se))
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.stage1(self.stage0(x))
        out = self.gap(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


class ExtraBranchBlock(OriginalRepVGGBlock):
    """A RepVGG-like block with a fourth branch repq has never seen."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.rbr_extra = conv_bn(cin, cout, 3, 1, 1)

    def forward(self, inputs):
        return super().forward(inputs) + self.rbr_extra(inputs)


# --- meituan/YOLOv6: yolov6/layers/common.py ----------------------------------------------------------------------

class QARepVGGBlockV2(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.deploy, self.in_channels, self.groups = False, cin, 1
        self.nonlinearity, self.se = nn.ReLU(), nn.Identity()
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1)
        self.bn = nn.BatchNorm2d(cout)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.rbr_identity = nn.Identity() if cout == cin and stride == 1 else None
        self.rbr_avg = nn.AvgPool2d(3, stride=stride, padding=1) if cout == cin and stride == 1 else None
        self._id_tensor = None

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        avg_out = 0 if self.rbr_avg is None else self.rbr_avg(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out + avg_out)))

    def switch_to_deploy(self):   # YOLOv6 keeps the post-sum BN ("keep post bn for QAT")
        if hasattr(self, "rbr_reparam"):
            return
        kernel, _ = _fold(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        bias = _fold(self.rbr_dense.conv.weight, self.rbr_dense.bn)[1]
        kernel = kernel + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if self.rbr_avg is not None:
            kernel = kernel + _eye(self.in_channels, 1).sum((2, 3), keepdim=True).expand(-1, -1, 3, 3) / 9
        if self.rbr_identity is not None:
            kernel = kernel + _eye(self.in_channels, 1)
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel.detach(), bias.detach()
        del self.rbr_dense, self.rbr_1x1
        for name in ("rbr_identity", "rbr_avg"):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True


class RepVGGBlock(OriginalRepVGGBlock):   # YOLOv6's RepVGGBlock is the original one (no SE), + switch_to_deploy
    def __init__(self, cin, cout, stride=1):
        super().__init__(cin, cout, stride)
        self.in_channels = cin

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        return super().forward(inputs)

    def switch_to_deploy(self):
        kernel, bias = _three_branches(self.rbr_dense, self.rbr_1x1, self.rbr_identity, self.in_channels)
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, bias=True)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel.detach(), bias.detach()
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity


class SimConv(nn.Module):
    def __init__(self, cin, cout, k, stride, act=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class RepBlock(nn.Module):
    def __init__(self, cin, cout, n=1, block=RepVGGBlock):
        super().__init__()
        self.conv1 = block(cin, cout)
        self.block = nn.Sequential(*(block(cout, cout) for _ in range(n - 1))) if n > 1 else None

    def forward(self, x):
        x = self.conv1(x)
        return self.block(x) if self.block is not None else x


class BottleRep(nn.Module):
    def __init__(self, cin, cout, basic_block=RepVGGBlock, weight=False):
        super().__init__()
        self.conv1, self.conv2 = basic_block(cin, cout), basic_block(cout, cout)
        self.shortcut = cin == cout
        self.alpha = nn.Parameter(torch.ones(1)) if weight else 1.0

    def forward(self, x):
        outputs = self.conv2(self.conv1(x))
        return outputs + self.alpha * x if self.shortcut else outputs


class BepC3(nn.Module):   # YOLOv6 v3's CSP stage: ConvModules around a RepBlock of BottleReps (learned alpha)
    def __init__(self, cin, cout, n=2, e=0.5, block=RepVGGBlock):
        super().__init__()
        c_ = int(cout * e)
        self.cv1, self.cv2, self.cv3 = SimConv(cin, c_, 1, 1), SimConv(cin, c_, 1, 1), SimConv(2 * c_, cout, 1, 1)
        self.m = nn.Sequential(*(BottleRep(c_, c_, block, weight=True) for _ in range(n // 2)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SimSPPF(nn.Module):
    def __init__(self, cin, cout, kernel_size=5):
        super().__init__()
        c_ = cin // 2
        self.cv1, self.cv2 = SimConv(cin, c_, 1, 1), SimConv(c_ * 4, cout, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class EfficientRep(nn.Module):
    def __init__(self, ch=(8, 16, 16, 32), block=RepVGGBlock):
        super().__init__()
        self.stem = block(1, ch[0], 2)
        self.ERBlock_2 = nn.Sequential(block(ch[0], ch[1], 2), RepBlock(ch[1], ch[1], 1, block))
        self.ERBlock_3 = nn.Sequential(block(ch[1], ch[2], 2), RepBlock(ch[2], ch[2], 2, block))
        self.ERBlock_4 = nn.Sequential(block(ch[2], ch[3], 2), RepBlock(ch[3], ch[3], 1, block),
                                       SimSPPF(ch[3], ch[3]))

    def forward(self, x):
        outputs = []
        x = self.ERBlock_2(self.stem(x))
        outputs.append(x)
        x = self.ERBlock_3(x)
        outputs.append(x)
        outputs.append(self.ERBlock_4(x))
        return tuple(outputs)


class RepPANNeck(nn.Module):
    def __init__(self, ch=(16, 16, 32), block=RepVGGBlock):
        super().__init__()
        c3, c4, c5 = ch
        self.reduce_layer0 = SimConv(c5, c4, 1, 1)
        self.upsample0 = nn.Upsample(scale_factor=2, mode="nearest")
        self.Rep_p4 = RepBlock(c4 + c4, c4, 1, block)
        self.reduce_layer1 = SimConv(c4, c3, 1, 1)
        self.Rep_p3 = RepBlock(c3 + c3, c3, 1, block)
        self.downsample2 = SimConv(c3, c3, 3, 2)
        self.Rep_n3 = RepBlock(c3 + c3, c4, 1, block)
        self.downsample1 = SimConv(c4, c4, 3, 2)
        self.Rep_n4 = RepBlock(c4 + c4, c5, 1, block)

    def forward(self, inputs):
        x2, x1, x0 = inputs
        fpn_out0 = self.reduce_layer0(x0)
        f_out0 = self.Rep_p4(torch.cat([self.upsample0(fpn_out0), x1], 1))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(torch.cat([F.interpolate(fpn_out1, scale_factor=2, mode="nearest"), x2], 1))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return [pan_out2, pan_out1, pan_out0]


class EfficientDecoupledHead(nn.Module):
    def __init__(self, ch=(16, 16, 32), num_classes=3):
        super().__init__()
        self.stems = nn.ModuleList(SimConv(c, c, 1, 1, nn.SiLU) for c in ch)
        self.cls_convs = nn.ModuleList(SimConv(c, c, 3, 1, nn.SiLU) for c in ch)
        self.reg_convs = nn.ModuleList(SimConv(c, c, 3, 1, nn.SiLU) for c in ch)
        self.cls_preds = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in ch)
        self.reg_preds = nn.ModuleList(nn.Conv2d(c, 4, 1) for c in ch)

    def forward(self, xs):
        outputs = []
        for i, x in enumerate(xs):
            x = self.stems[i](x)
            cls_output = torch.sigmoid(self.cls_preds[i](self.cls_convs[i](x)))
            reg_output = self.reg_preds[i](self.reg_convs[i](x))
            outputs.append(torch.cat([reg_output, cls_output], 1))
        return tuple(outputs)


class YOLOv6Like(nn.Module):
    def __init__(self, block=RepVGGBlock):
        super().__init__()
        self.backbone, self.neck = EfficientRep(block=block), RepPANNeck(block=block)
        self.detect = EfficientDecoupledHead()

    def forward(self, x):
        return self.detect(self.neck(self.backbone(x)))


def yolov6_fuse_model(model):
    """YOLOv6's deploy path: switch_to_deploy on every Rep block, then fuse_model (conv+BN of each Conv/SimConv
    fused, `bn` deleted, forward replaced by forward_fuse)."""
    for m in model.modules():
        if hasattr(m, "switch_to_deploy") and callable(m.switch_to_deploy):
            m.switch_to_deploy()
    for m in model.modules():
        if isinstance(m, SimConv) and hasattr(m, "bn"):
            w, b = _fold(m.conv.weight, m.bn)
            m.conv = nn.Conv2d(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride,
                               m.conv.padding, bias=True)
            m.conv.weight.data, m.conv.bias.data = w.detach(), b.detach()
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


# --- timm byobnet ---------------------------------------------------------------------------------------------------

class SEModule(nn.Module):   # timm.layers.SEModule
    def __init__(self, channels, rd_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.bn, self.act = nn.Identity(), nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        x_se = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * self.gate(x_se)


class ConvNormAct(nn.Module):   # timm.layers.ConvNormAct without activation
    def __init__(self, cin, cout, k, stride, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class TimmMobileOneBlock(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, num_conv_branches=2, use_attn=True):
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList([ConvNormAct(cin, cout, k, stride, groups) for _ in range(num_conv_branches)])
        self.conv_scale = ConvNormAct(cin, cout, 1, stride, groups) if k > 1 else None
        self.attn = SEModule(cout, max(1, cout // 4)) if use_attn else nn.Identity()
        self.drop_path, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        identity = x
        x = sum(conv(x) for conv in self.conv_kxk)
        if self.conv_scale is not None:
            x = x + self.conv_scale(identity)
        if self.identity is not None:
            x = self.drop_path(x) + self.identity(identity)
        return self.act(self.attn(x))


def timm_mobileone(width=8, num_classes=10):
    return nn.Sequential(TimmMobileOneBlock(1, width, stride=1), TimmMobileOneBlock(width, width, groups=width),
                         TimmMobileOneBlock(width, 2 * width, k=1), TimmMobileOneBlock(2 * width, 2 * width, stride=2,
                                                                                        groups=2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def qarepvgg_v2_net(width=8, num_classes=10):
    return nn.Sequential(QARepVGGBlockV2(1, width), QARepVGGBlockV2(width, width),
                         QARepVGGBlockV2(width, 2 * width, 2), QARepVGGBlockV2(2 * width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


class Transpose(nn.Module):   # YOLOv6's default upsampling in the Rep-PAN neck
    def __init__(self, cin, cout):
        super().__init__()
        self.upsample_transpose = nn.ConvTranspose2d(cin, cout, 2, 2, bias=True)

    def forward(self, x):
        return self.upsample_transpose(x)
