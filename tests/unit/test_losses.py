"""MultiTaskLoss: task weights, class weights, ignored labels."""

import pytest
import torch
import torch.nn.functional as F

from fashion_lightning.models.losses import IGNORE_INDEX, MultiTaskLoss


def _batch():
    torch.manual_seed(0)
    logits = {"a": torch.randn(8, 3), "b": torch.randn(8, 2)}
    labels = torch.tensor([[0, 1], [1, 0], [2, 1], [0, 0], [1, 1], [2, 0], [0, 1], [1, 0]])
    return logits, labels


def test_total_is_weighted_sum_of_task_losses():
    logits, labels = _batch()
    loss = MultiTaskLoss(["a", "b"], task_weights={"a": 2.0, "b": 0.5})(logits, labels)
    expected_a = F.cross_entropy(logits["a"], labels[:, 0])
    expected_b = F.cross_entropy(logits["b"], labels[:, 1])
    assert torch.allclose(loss["a"], expected_a) and torch.allclose(loss["b"], expected_b)
    assert torch.allclose(loss["loss"], 2.0 * expected_a + 0.5 * expected_b)


def test_class_weight_raises_the_share_of_the_upweighted_class():
    logits, labels = _batch()
    logits = {"a": torch.zeros(8, 3)}  # uniform predictions: every item costs log(3)
    logits["a"][labels[:, 0] == 2, 2] = 5.0  # class 2 predicted well, others badly
    plain = MultiTaskLoss(["a"])(logits, labels)["a"]
    up_bad = MultiTaskLoss(["a"], class_weights={"a": [5.0, 5.0, 1.0]})(logits, labels)["a"]
    up_good = MultiTaskLoss(["a"], class_weights={"a": [1.0, 1.0, 5.0]})(logits, labels)["a"]
    # weighting the badly predicted classes up raises the (weighted-mean) loss; the well predicted one lowers it
    assert up_bad > plain > up_good
    manual = F.cross_entropy(logits["a"], labels[:, 0], weight=torch.tensor([1.0, 1.0, 5.0]))
    assert torch.allclose(up_good, manual)


def test_unknown_labels_are_ignored_and_all_unknown_gives_zero():
    logits, labels = _batch()
    masked = labels.clone()
    masked[:4, 0] = IGNORE_INDEX
    loss = MultiTaskLoss(["a", "b"])(logits, masked)
    assert torch.allclose(loss["a"], F.cross_entropy(logits["a"][4:], labels[4:, 0]))
    masked[:, 0] = IGNORE_INDEX
    loss = MultiTaskLoss(["a", "b"])(logits, masked)
    assert loss["a"].item() == 0.0 and torch.isfinite(loss["loss"])


def test_bad_config_is_refused_clearly():
    with pytest.raises(ValueError, match="not trained"):
        MultiTaskLoss(["a"], task_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="label_smoothing"):
        MultiTaskLoss(["a"], label_smoothing=1.5)
