"""Fine-tuning switches (EMA, mixup/cutmix, layer decay, flip TTA, optimiser objects, compile), synthetic catalog."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fashion_lightning.apps.train import train
from fashion_lightning.models.finetune import ema_avg_fn, ema_callbacks
from fashion_lightning.models.losses import MultiTaskLoss
from fashion_lightning.models.mixup import MultiTaskMixup
from fashion_lightning.models.multitask import MultiTaskNet
from fashion_lightning.models.optim import OptimSetup, build_scheduler, layer_scales, param_groups
from hydra_helpers import QUIET, TINY_MODEL, make_cfg

TINY = [
    *TINY_MODEL,
    "data.num_items=360",
    "data.train_transform=null",
    "callbacks.evaluation.plot_every_n_val_epochs=100",
    "callbacks.model_checkpoint.save_last=false",
    *QUIET,
]
LEARNS = ("articleType", "baseColour", "masterCategory")


# --- fast unit checks -------------------------------------------------------------------------
def test_param_groups_never_decay_1d_parameters() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    groups = param_groups(
        net.named_parameters(), lr=0.1, weight_decay=0.05, lr_scale=lambda n: 0.5 if n.startswith("0.") else 1.0
    )
    for group in groups:
        dims = {p.ndim for p in group["params"]}
        assert group["weight_decay"] == (0.0 if dims == {1} else 0.05), (dims, group["weight_decay"])
    assert sorted(g["lr"] for g in groups) == [0.05, 0.05, 0.1, 0.1]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_optimizer_config_over_the_shipped_defaults_and_group_rules_apart() -> None:
    # a module built in Python gets conf/model/multitask.yaml's nodes, key by key, as a Hydra override would
    setup = OptimSetup.resolve({"lr": 0.1}, {"warmup_ratio": 0.2}, {"backbone_lr_ratio": 0.5}, "multitask")
    assert setup.optimizer == {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.1, "weight_decay": 0.01}
    assert setup.rules == {"backbone_lr_ratio": 0.5}  # layer_decay: null = off
    assert setup.scheduler["warmup_ratio"] == 0.2 and setup.scheduler["min_lr_ratio"] == 0.01
    with pytest.raises(ValueError, match=r"param_groups \(model.param_groups.backbone_lr_ratio\)"):
        OptimSetup.resolve({"lr": 0.1, "backbone_lr_ratio": 0.5}, None, None, "multitask")
    with pytest.raises(ValueError, match="unknown param_groups rule 'lr_ratio'"):
        OptimSetup.resolve(None, None, {"lr_ratio": 0.5}, "multitask")


def test_layer_decay_scales_fall_towards_the_stem() -> None:
    net = MultiTaskNet({"a": 3}, backbone="test_resnet", image_size=(40, 32))
    scales = layer_scales(net.backbone, 0.5)
    assert set(scales) == {n for n, _ in net.backbone.named_parameters()}
    first, last = next(iter(scales)), list(scales)[-1]
    assert scales[first] < scales[last] <= 1.0


def test_mixup_loss_is_the_lam_weighted_pair_and_cutmix_lam_is_the_kept_area() -> None:
    torch.manual_seed(0)
    loss = MultiTaskLoss(["a", "b"], label_smoothing=0.0)
    logits = {"a": torch.randn(6, 3), "b": torch.randn(6, 4)}
    labels = torch.tensor([[0, 1], [1, -1], [2, 3], [0, 0], [1, 2], [2, -1]])
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    mixed = loss(logits, labels, (perm, 0.3))
    for column, task in enumerate(("a", "b")):
        expected = 0.3 * loss.task_loss(task, logits[task], labels[:, column]) + 0.7 * loss.task_loss(
            task, logits[task], labels[perm, column]
        )
        assert torch.allclose(mixed[task], expected)
    mixer = MultiTaskMixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, seed=0)
    x = torch.zeros(4, 3, 20, 16)
    x[1] = 1.0
    out, (perm, lam) = mixer(x)
    kept = (out == x).all(dim=1).float().mean(dim=(1, 2))  # share of pixels each image kept
    changed = [i for i in range(4) if not torch.equal(x[i], x[perm[i]])]
    assert 0.0 <= lam <= 1.0 and all(abs(float(kept[i]) - lam) < 1e-6 for i in changed)


def test_ema_update_warms_up_then_follows_decay() -> None:
    avg = ema_avg_fn(decay=0.9, warmup=10)
    a, c = torch.zeros(3), torch.ones(3)
    assert torch.allclose(avg(a, c, torch.tensor(0)), torch.full((3,), 0.9))  # (1+0)/(10+0)=0.1 kept
    assert torch.allclose(avg(a, c, torch.tensor(1000)), torch.full((3,), 0.1))
    assert ema_callbacks(None) == [] and len(ema_callbacks({"decay": 0.99})) == 1
    with pytest.raises(ValueError, match="decay"):
        ema_callbacks(1.5)


def test_flip_tta_is_mirror_invariant() -> None:
    torch.manual_seed(0)
    net = MultiTaskNet({"a": 3}, backbone="test_resnet", image_size=(40, 32)).eval()
    images = torch.randint(0, 256, (2, 3, 80, 60), dtype=torch.uint8)
    with torch.no_grad():
        logits, emb = net(images, flip_tta=True)
        mirrored, emb_m = net(images.flip(-1), flip_tta=True)
    assert torch.allclose(logits["a"], mirrored["a"], atol=1e-4) and torch.allclose(emb, emb_m, atol=1e-4)


# --- the switches on a short fit: they run together and the model still learns ---------------------
# (one fit for all four keeps CI short; the unit checks above test each mechanism on its own)
SWITCHES = [
    "model.ema={decay:0.99,warmup:10}",
    "model.mixup={mixup_alpha:0.2,cutmix_alpha:1.0,prob:0.5,switch_prob:0.5}",
    "model.param_groups.layer_decay=0.7",
    "model.flip_tta=true",
]
SGD = ["model.optimizer._target_=torch.optim.SGD", "+model.optimizer.momentum=0.9", "model.optimizer.lr=0.05"]


@pytest.mark.slow
def test_switches_run_and_learn_above_majority_baseline(tmp_path: Path, cache_dir: Path) -> None:
    cfg = make_cfg("train", tmp_path / "run", cache_dir, TINY + ["trainer.max_epochs=6", *SWITCHES])
    metrics = train(cfg)
    lifts = {t: metrics[f"test/acc/{t}"] - metrics[f"test/baseline/{t}"] for t in LEARNS}
    assert all(lift > 0.15 for lift in lifts.values()), lifts


@pytest.mark.slow
def test_optimizer_target_from_the_command_line_reaches_the_trainer(tmp_path: Path, cache_dir: Path) -> None:
    from hydra.utils import instantiate

    cfg = make_cfg("train", tmp_path / "run", cache_dir, TINY + SGD)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    module = instantiate(cfg.model, vocabs=dm.vocabs, class_weights=dm.class_weights)
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # what configure_optimizers reads
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 0.0 or all(p.ndim > 1 for p in group["params"])


@pytest.mark.slow
def test_compile_happens_in_configure_model_and_checkpoints_stay_plain(tmp_path: Path, cache_dir: Path) -> None:
    from fashion_lightning.models.base import load_module
    from fashion_lightning.models.multitask_module import MultiTaskModule

    net = {
        "_target_": "fashion_lightning.models.multitask.MultiTaskNet",
        "backbone": "test_resnet",
        "image_size": [40, 32],
    }
    module = MultiTaskModule(net, {"gender": ["Men", "Women"]}, compile={"backend": "eager"})
    assert module.net.backbone._compiled_call_impl is None  # building (eval, index) never compiles
    module.configure_model()
    assert module.net.backbone._compiled_call_impl is not None
    # a real fit (the eager backend keeps CI fast: inductor codegen takes minutes on 2 shared cores)
    limits = ["+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1"]
    overrides = TINY + ["model.compile={backend:eager}", "trainer.max_epochs=1", *limits]
    overrides += ["callbacks.model_checkpoint.save_last=true"]
    cfg = make_cfg("train", tmp_path / "run", cache_dir, overrides)
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any("_orig_mod" in k for k in state["state_dict"])  # in-place Module.compile keeps the keys
    module = load_module(str(ckpt))
    assert module.hparams.compile is False and getattr(module.net.backbone, "_compiled_call_impl", None) is None


def test_an_unbounded_run_asks_for_its_length_instead_of_overflowing():
    # Trainer.estimated_stepping_batches is inf with max_epochs=-1 and max_steps=-1: the warmup-cosine
    # schedule used to die in round(inf) with an OverflowError
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="set trainer.max_epochs or trainer.max_steps"):
        build_scheduler(None, optimizer, float("inf"))
    assert build_scheduler(None, optimizer, 10)["interval"] == "step"
    step_lr = {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 5}  # takes no total_steps: inf is fine
    assert isinstance(build_scheduler(step_lr, optimizer, float("inf"))["scheduler"], torch.optim.lr_scheduler.StepLR)
