"""fashion-export writes graphs ONNX Runtime can fuse: timm's run-time "SAME" padding becomes constant padding
that ends up inside the convolutions (no Pad, no shape arithmetic left after ONNX Runtime's optimizer), with
the same answers as PyTorch. Before: five Pads and their NCHWc re-orderings were 27% of lite0's graph time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip(
    "onnxruntime", reason="fashion-export needs the [export] extra: pip install 'fashion-lightning[export]'"
)
onnx = pytest.importorskip("onnx", reason="fashion-export needs the [export] extra")

from timm.layers import Conv2dSame  # noqa: E402

from fashion_lightning.deploy.onnx_export import _export, static_same_padding  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2),  # 15x12 -> asymmetric padding on one axis
        nn.ReLU6(),
        Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False),  # depthwise, as in EfficientNet
        nn.Conv2d(8, 4, 1),
        Conv2dSame(4, 4, 5, stride=1),  # symmetric: becomes the convolution's own padding
    ).eval()


def _optimized_ops(path, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable rewrites only
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_same_padding_is_constant_and_fused_into_the_convolutions(tmp_path):
    net, example = _net(), torch.randint(0, 255, (2, 3, 15, 12)).float()
    with static_same_padding(net, example) as replaced:
        _export(net, example, tmp_path / "net.onnx", "x", ["y"])
    assert replaced == 3
    assert sum(isinstance(m, Conv2dSame) for m in net.modules()) == 3  # the module is given back as it was

    ops = _optimized_ops(tmp_path / "net.onnx", tmp_path)
    assert ops.count("Conv") == 4 and "Pad" not in ops and "Shape" not in ops, ops
    session = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    photos = torch.randint(0, 255, (5, 3, 15, 12)).float()  # another batch size: only that axis is free
    with torch.no_grad():
        expected = net(photos).numpy()
    np.testing.assert_allclose(session.run(None, {"x": photos.numpy()})[0], expected, rtol=1e-4, atol=1e-3)


def test_without_the_static_padding_the_runtime_keeps_pads_and_shape_arithmetic(tmp_path):
    """The contrast that makes the test above mean something: the plain export leaves them in."""
    net, example = _net(), torch.randint(0, 255, (2, 3, 15, 12)).float()
    _export(net, example, tmp_path / "plain.onnx", "x", ["y"])
    ops = _optimized_ops(tmp_path / "plain.onnx", tmp_path)
    assert "Pad" in ops
