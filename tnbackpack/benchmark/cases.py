"""Reference layers and networks of the benchmark, defined from published shapes.

Nothing here imports torchvision (it does not import beside the CPU torch
wheel); every architecture is written out from its paper or reference code.

Single-layer cases (``kind="layer"``) are ``layer(s) -> Flatten ->
Linear(->10)`` with the linear head frozen (``requires_grad_(False)``), so the
head's own quantity (its Kronecker factor, its per-sample gradients) does not
dominate the measurement; the head still backpropagates the loss curvature to
the layer, as in a real network. Whole networks (``kind="net"``) train every
parameter: BackPACK's own rules handle the linear layers in both runs.

Sizes used, and how they differ from the published ones (to keep the whole
benchmark, 13 extensions x 10 cases x 3 variants, within ~25 minutes on one
CPU thread):

==================  =====================================  ===================
case                layer(s)                               input per sample
==================  =====================================  ===================
3c3d                DeepOBS CIFAR-10 3c3d, as published     3 x 32 x 32
2c2d                DeepOBS MNIST 2c2d, as published        1 x 28 x 28
allcnnc             DeepOBS CIFAR-100 All-CNN-C, no dropout 3 x 32 x 32
resnet18_3x3        conv2_x 3x3 64->64, pad 1, no bias      64 x 32 x 32 (56)
resnet18_1x1s2      conv3_x shortcut 1x1/2 64->128, no bias 64 x 56 x 56
mobilenetv2_dw      depthwise 3x3/2, 96 ch (groups 96)      96 x 56 x 56 (112)
convnext_stem       4x4/4 patchify stem 3->96, bias         3 x 64 x 64 (224)
inceptionv3_7x7     Mixed_6b 1x7 128->128, 7x1 128->192     128 x 17 x 17
m5_audio            M5 conv 1->32 k80/4, ReLU, 32->32 k3    1 x 4000
c3d_video           C3D conv1a 3x3x3 3->64, pad 1           3 x 8 x 32 x 32
==================  =====================================  ===================

(published spatial size in parentheses where it was reduced). Details:

* DeepOBS 3c3d: TF's ``'same'`` max-pool 3/2 is ``MaxPool2d(3, 2, padding=1)``
  (same output sizes 28->14, 12->6, 6->3); the ``'same'`` 3x3 conv is
  ``padding=1``.
* DeepOBS All-CNN-C: TF ``'same'`` stride-2 convs are ``padding=1`` (same
  output sizes 32->16->8); the dropout layers are left out (they only add
  random masks, identical work for both implementations); global average
  pooling over the final 6x6 map is ``AvgPool2d(6)``.
* Integer paddings instead of ``padding='same'`` everywhere: BackPACK 1.7.1
  crashes or is wrong with the string form (DESIGN.md section 4), and the
  benchmark compares speed where BackPACK can run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor, nn

#: Extensions that backpropagate one GGN column per class through every layer.
EXACT_GGN_FAMILY = (
    "KFLR",
    "DiagGGNExact",
    "DiagHessian",
    "SqrtGGNExact",
    "BatchDiagGGNExact",
)


@dataclass(frozen=True)
class Case:
    """One benchmark model: a reference layer with a frozen head, or a whole net.

    Attributes:
        name: Short identifier used on the command line (``--cases``).
        kind: ``"layer"`` (layer(s) + frozen linear head) or ``"net"``.
        description: What the case is, for the report.
        input_shape: Shape of one sample, without the batch dimension.
        num_classes: Number of classes of the cross-entropy loss.
        trunk: Builds the layer(s) (``kind="layer"``) or the whole network.
        slow: Extensions skipped unless asked for, with the reason.
    """

    name: str
    kind: str
    description: str
    input_shape: Tuple[int, ...]
    num_classes: int
    trunk: Callable[[], nn.Module]
    slow: Dict[str, str] = field(default_factory=dict)

    def model(self, seed: int = 0) -> nn.Sequential:
        """The model, deterministically initialized from ``seed``."""
        torch.manual_seed(seed)
        trunk = self.trunk()
        if self.kind == "net":
            return trunk
        features = nn.Sequential(*_children(trunk), nn.Flatten())
        with torch.no_grad():
            num_features = features(torch.zeros(1, *self.input_shape)).shape[1]
        head = nn.Linear(num_features, self.num_classes).requires_grad_(False)
        return nn.Sequential(*features, head)

    def data(self, batch_size: int, seed: int = 1) -> Tuple[Tensor, Tensor]:
        """Random inputs ``[N, *input_shape]`` and labels ``[N]``."""
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, *self.input_shape, generator=generator)
        y = torch.randint(self.num_classes, (batch_size,), generator=generator)
        return x, y


def _children(module: nn.Module) -> List[nn.Module]:
    """The layers of a ``Sequential``, or the module itself."""
    return list(module) if isinstance(module, nn.Sequential) else [module]


# ------------------------------------------------------------------ networks
def deepobs_3c3d() -> nn.Sequential:
    """DeepOBS CIFAR-10 3c3d: 3 conv + 3 dense layers (895k parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def deepobs_2c2d() -> nn.Sequential:
    """DeepOBS MNIST 2c2d: 2 conv + 2 dense layers (3.3M parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def deepobs_allcnnc() -> nn.Sequential:
    """DeepOBS CIFAR-100 All-CNN-C (Springenberg et al. 2015), without dropout."""
    layers: List[nn.Module] = []
    convs = [  # (in, out, kernel, stride, padding)
        (3, 96, 3, 1, 1),
        (96, 96, 3, 1, 1),
        (96, 96, 3, 2, 1),
        (96, 192, 3, 1, 1),
        (192, 192, 3, 1, 1),
        (192, 192, 3, 2, 1),
        (192, 192, 3, 1, 0),
        (192, 192, 1, 1, 0),
        (192, 100, 1, 1, 0),
    ]
    for c_in, c_out, kernel, stride, padding in convs:
        layers += [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.ReLU()]
    return nn.Sequential(*layers, nn.AvgPool2d(6), nn.Flatten())


# ------------------------------------------------------------- single layers
def inception_7x7() -> nn.Sequential:
    """InceptionV3 Mixed_6b ``branch7x7``: factorized 7x7 as 1x7 then 7x1."""
    return nn.Sequential(
        nn.Conv2d(128, 128, (1, 7), padding=(0, 3), bias=False),
        nn.ReLU(),
        nn.Conv2d(128, 192, (7, 1), padding=(3, 0), bias=False),
    )


def m5_audio() -> nn.Sequential:
    """First two convolutions of M5 (Dai et al. 2017), 32 channels."""
    return nn.Sequential(
        nn.Conv1d(1, 32, 80, stride=4), nn.ReLU(), nn.Conv1d(32, 32, 3)
    )


_SLOW_ALLCNNC = (
    "100 classes: 100 GGN columns backpropagated through 9 conv layers "
    "(~0.5 TFLOP/layer, >1 min per backward); include with --include-slow"
)

CASES: Dict[str, Case] = {
    case.name: case
    for case in [
        Case("3c3d", "net", "DeepOBS 3c3d (CIFAR-10)", (3, 32, 32), 10, deepobs_3c3d),
        Case("2c2d", "net", "DeepOBS 2c2d (MNIST)", (1, 28, 28), 10, deepobs_2c2d),
        Case(
            "allcnnc",
            "net",
            "DeepOBS All-CNN-C (CIFAR-100)",
            (3, 32, 32),
            100,
            deepobs_allcnnc,
            slow=dict.fromkeys(EXACT_GGN_FAMILY, _SLOW_ALLCNNC),
        ),
        Case(
            "resnet18_3x3",
            "layer",
            "ResNet-18 conv 3x3 64->64 (32x32)",
            (64, 32, 32),
            10,
            lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False),
        ),
        Case(
            "resnet18_1x1s2",
            "layer",
            "ResNet-18 shortcut 1x1/2 64->128 (56x56)",
            (64, 56, 56),
            10,
            lambda: nn.Conv2d(64, 128, 1, stride=2, bias=False),
        ),
        Case(
            "mobilenetv2_dw",
            "layer",
            "MobileNetV2 depthwise 3x3/2, 96 ch (56x56)",
            (96, 56, 56),
            10,
            lambda: nn.Conv2d(96, 96, 3, stride=2, padding=1, groups=96, bias=False),
        ),
        Case(
            "convnext_stem",
            "layer",
            "ConvNeXt stem 4x4/4 3->96 (64x64)",
            (3, 64, 64),
            10,
            lambda: nn.Conv2d(3, 96, 4, stride=4),
        ),
        Case(
            "inceptionv3_7x7",
            "layer",
            "InceptionV3 1x7 + 7x1, 128->128->192 (17x17)",
            (128, 17, 17),
            10,
            inception_7x7,
        ),
        Case(
            "m5_audio",
            "layer",
            "M5 Conv1d k80/4 1->32, k3 32->32 (4000)",
            (1, 4000),
            10,
            m5_audio,
        ),
        Case(
            "c3d_video",
            "layer",
            "C3D conv1a Conv3d 3x3x3 3->64 (8x32x32)",
            (3, 8, 32, 32),
            10,
            lambda: nn.Conv3d(3, 64, 3, padding=1),
        ),
    ]
}

#: The cases of ``--quick``: one 2d layer, one stack with backpropagation, 1d.
QUICK_CASES = ("resnet18_1x1s2", "inceptionv3_7x7", "m5_audio")
