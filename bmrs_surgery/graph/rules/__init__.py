"""The built-in operation rules, one file per family; importing this package registers them.

layers (Linear, convolutions, Embedding, functional linear), conv_functional (F.conv1d/2d/3d),
norms (batch/instance/group/layer norm modules, functional layer_norm), batch_norm (functional
batch_norm and instance_norm), elementwise (activations, binary operations), pooling, shape_ops
(view/reshape, permute, cat, split, getitem, reductions, softmax ...), attention (matmul, einsum,
scaled_dot_product_attention), vision_ops (functional group_norm, repeat, roll, pixel shuffle,
transposed convolutions); timm_layers (timm's copies of torch layers, registered once timm is imported).
"""

from . import (  # noqa: F401 - aten: torch.export graphs; transformers_layers: GPT-2's Conv1D
    aten,
    attention,
    batch_norm,
    conv_functional,
    elementwise,
    layers,
    norms,
    pooling,
    shape_ops,
    transformers_layers,
    vision_ops,
)
