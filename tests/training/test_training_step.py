"""The self-distillation step against hand-written float64 references of the paper's loss (docs/method.md)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adaptive_kernels import create_model
from adaptive_kernels.training.losses import (
    classification_loss,
    distillation_kl,
    mixup_batch,
    pooled_feature_kl,
    smooth_one_hot,
)
from adaptive_kernels.training.step import StepConfig, forward_backward, train_step

NUM_CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet20_adn", num_classes=NUM_CLASSES, in_chans=1, width=2).to(dtype)
    # Non-trivial BN affine parameters, so that a wrong norm set (normal vs _skip) changes the result.
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def batch(n=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def ref_kl(student, teacher, temperature, top_k):
    """T² · Σ_k p_t (log p_t − log p_s), batch mean, over the teacher's top-k classes; written out by hand."""
    if top_k < teacher.shape[1]:
        idx = torch.argsort(teacher, dim=1, descending=True)[:, :top_k]
        student, teacher = torch.gather(student, 1, idx), torch.gather(teacher, 1, idx)
    s, t = student / temperature, teacher / temperature
    log_ps = s - torch.log(torch.exp(s).sum(1, keepdim=True))
    log_pt = t - torch.log(torch.exp(t).sum(1, keepdim=True))
    return temperature**2 * (torch.exp(log_pt) * (log_pt - log_ps)).sum() / student.shape[0]


def ref_ce(logits, labels, label_smoothing=0.0):
    log_p = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    k = logits.shape[1]
    target = torch.full_like(log_p, label_smoothing / k)
    target[torch.arange(len(labels)), labels] += 1.0 - label_smoothing
    return -(target * log_p).sum() / len(labels)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_grads_equal(got, want):
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=f"gradient of {n}")


# ---- losses -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [3, 5, 500])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_kl_matches_hand_written_reference(top_k, temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = torch.randn(7, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        distillation_kl(s, t, temperature, top_k).double(), ref_kl(s, t, temperature, min(top_k, 5)),
        rtol=1e-6, atol=1e-7,
    )


def test_distillation_kl_is_zero_for_equal_logits_and_detaches_the_teacher():
    s = torch.randn(4, 6, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    loss = distillation_kl(s, t, 1.0, None)
    assert loss.abs().item() < 1e-6
    (distillation_kl(s, t * 2, 1.0, None)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # no gradient reaches the teacher


def test_classification_loss_soft_targets_and_label_smoothing():
    logits, labels = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    torch.testing.assert_close(classification_loss(logits, labels, 0.1), ref_ce(logits, labels, 0.1))
    soft = smooth_one_hot(labels, 4, 0.1).double()
    torch.testing.assert_close(classification_loss(logits, soft).double(), ref_ce(logits, labels, 0.1))


def test_mixup_batch_blends_images_and_targets_with_one_lambda():
    x, y = torch.randn(4, 1, 3, 3), torch.tensor([0, 1, 2, 3])
    lam = float(np.random.default_rng(7).beta(0.4, 0.4))
    mixed, targets = mixup_batch(x, y, 4, 0.4, np.random.default_rng(7))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    want = lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y.flip(0), 4).float()
    torch.testing.assert_close(targets, want)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))


def test_pooled_feature_kl_equals_kl_of_pooled_channels():
    a = [torch.randn(3, 4, 5, 5, dtype=torch.float64), torch.randn(3, 8, 2, 2, dtype=torch.float64)]
    b = [torch.randn_like(t) for t in a]
    want = sum(ref_kl(x.mean((2, 3)), y.mean((2, 3)), 2.0, 10**6) for x, y in zip(a, b))
    torch.testing.assert_close(pooled_feature_kl(a, b, 2.0).double(), want)


# ---- the training step ------------------------------------------------------------------------------------
def ref_adn_loss(model, x, y, alpha, temperature, top_k, label_smoothing=0.0, detach_teacher=True):
    teacher = model(x, skip="super")
    student = model(x, skip="base")
    t = teacher.detach() if detach_teacher else teacher
    return alpha * ref_ce(teacher, y, label_smoothing) + (1 - alpha) * ref_kl(student, t, temperature, top_k)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_adn_step_gradients_equal_hand_written_loss(label_smoothing):
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    x, y = batch()
    cfg = StepConfig(mode="adn", alpha=0.3, temperature=2.0, top_k=3, label_smoothing=label_smoothing)
    losses = forward_backward(model, x, y, cfg)

    ref_model.zero_grad()
    ref_adn_loss(ref_model, x, y, 0.3, 2.0, 3, label_smoothing).backward()
    assert_grads_equal(grads(model), grads(ref_model))
    torch.testing.assert_close(
        losses["loss_super"] + losses["loss_kd"],
        ref_adn_loss(copy.deepcopy(ref_model), x, y, 0.3, 2.0, 3, label_smoothing).detach(),
    )

    # The reference can tell a teacher that is not detached: the gradients then differ.
    leaky = copy.deepcopy(ref_model)
    leaky.zero_grad()
    ref_adn_loss(leaky, x, y, 0.3, 2.0, 3, label_smoothing, detach_teacher=False).backward()
    assert (grads(leaky)["fc.weight"] - grads(model)["fc.weight"]).abs().max() > 1e-6


def test_teacher_is_detached_in_the_step():
    """The KD backward must not touch the super-net's graph: its gradient w.r.t. the super-net logits is zero."""
    model = tiny_model()
    x, y = batch()
    seen = []
    real_forward = model.forward

    def forward(inp, skip=None):
        out = real_forward(inp, skip=skip)
        if model.parse_skip(skip) == (False,) * 3:
            out.register_hook(lambda g: seen.append(g.clone()))
        return out

    model.forward = forward
    forward_backward(model, x, y, StepConfig(mode="adn", alpha=0.5))
    # Exactly one gradient arrives at the teacher's logits: the CE's, softmax(z) - onehot(y) times alpha / N.
    assert len(seen) == 1
    with torch.no_grad():
        z = real_forward(x, skip="super")
    want = 0.5 * (F.softmax(z, 1) - F.one_hot(y, NUM_CLASSES)) / len(y)
    torch.testing.assert_close(seen[0], want, rtol=1e-4, atol=1e-6)  # BN batch stats moved: close, not equal


@pytest.mark.parametrize("mode,skip", [("plain", "super"), ("single", "base"), ("single", "TFT")])
def test_baseline_modes_are_plain_cross_entropy(mode, skip):
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    x, y = batch()
    forward_backward(model, x, y, StepConfig(mode=mode, skip=ref_model.parse_skip(skip) if mode == "single" else None))
    ref_model.zero_grad()
    ref_ce(ref_model(x, skip=skip), y).backward()
    assert_grads_equal(grads(model), grads(ref_model))


def test_feature_distillation_gradients_equal_manual_stage_outputs():
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    x, y = batch()
    forward_backward(model, x, y, StepConfig(mode="adn", alpha=0.4, temperature=1.5, top_k=500, feature_kd=0.7))

    def run(m, skip):  # the ResNet's forward spelled out, keeping each stage's output
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        stages = []
        for stage, flag in zip(m.stages, skip):
            h = stage(h, flag)
            stages.append(h)
        return m.fc(torch.flatten(m.avgpool(h), 1)), stages

    ref_model.zero_grad()
    t_logits, t_feats = run(ref_model, (False,) * 3)
    s_logits, s_feats = run(ref_model, (True,) * 3)
    feat = sum(ref_kl(s.mean((2, 3)), t.detach().mean((2, 3)), 1.5, 10**6) for s, t in zip(s_feats, t_feats))
    loss = 0.4 * ref_ce(t_logits, y) + 0.6 * (ref_kl(s_logits, t_logits.detach(), 1.5, 10**6) + 0.7 * feat)
    loss.backward()
    assert_grads_equal(grads(model), grads(ref_model))


def norm_groups(model):
    """BN module names: ``skip`` (the _skip twins), ``normal`` (their twins and the skippable blocks' norms —
    used only when nothing of their stage is skipped), ``shared`` (stem and downsample BNs: used by every pass)."""
    twins = model.skip_norm_twins()
    groups = {"skip": set(twins), "normal": set(twins.values()), "shared": set()}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d) and name not in groups["skip"] | groups["normal"]:
            block = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            groups["normal" if getattr(block, "skippable", False) else "shared"].add(name)
    return groups


def running_stats(model, names):
    return {n: torch.cat([model.get_submodule(n).running_mean, model.get_submodule(n).running_var]) for n in names}


def assert_same(a, b, what):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=f"{what}: {n}")


def assert_all_moved(a, b, what):
    for n in a:
        assert not torch.equal(a[n], b[n]), f"{what}: {n} did not move"


def test_skip_norm_statistics_change_only_in_base_passes():
    model = tiny_model(torch.float32)
    x, y = batch(dtype=torch.float32)
    groups = norm_groups(model)
    assert groups["skip"] and groups["normal"] and groups["shared"]
    before = {k: running_stats(model, v) for k, v in groups.items()}

    lone_super, lone_base = copy.deepcopy(model), copy.deepcopy(model)
    lone_super(x, skip="super")
    lone_base(x, skip="base")
    assert_same(running_stats(lone_super, groups["skip"]), before["skip"], "a super pass moved a _skip norm")
    assert_all_moved(running_stats(lone_super, groups["normal"]), before["normal"], "super pass")
    assert_same(running_stats(lone_base, groups["normal"]), before["normal"], "a base pass moved a normal norm")
    assert_all_moved(running_stats(lone_base, groups["skip"]), before["skip"], "base pass")
    for m in (lone_super, lone_base):
        assert_all_moved(running_stats(m, groups["shared"]), before["shared"], "shared norms run in every pass")

    # The ADN step = one super + one base pass: normal stats as after the lone super pass, _skip ones as after
    # the lone base pass.
    forward_backward(model, x, y, StepConfig(mode="adn"))
    assert_same(running_stats(model, groups["normal"]), running_stats(lone_super, groups["normal"]), "adn step")
    assert_same(running_stats(model, groups["skip"]), running_stats(lone_base, groups["skip"]), "adn step")

    # The plain baseline never uses the _skip norms.
    plain = tiny_model(torch.float32)
    forward_backward(plain, x, y, StepConfig(mode="plain"))
    assert_same(running_stats(plain, groups["skip"]), before["skip"], "plain step moved a _skip norm")


def test_train_step_takes_one_optimizer_step_with_both_passes_gradients():
    model = tiny_model()
    ref_model = copy.deepcopy(model)
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    real_step = opt.step
    opt.step = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]
    for p in model.parameters():  # stale gradients must be cleared by the step
        p.grad = torch.ones_like(p)
    train_step(model, opt, x, y, StepConfig(mode="adn", alpha=0.5, temperature=1.0, top_k=500))
    assert len(calls) == 1
    ref_model.zero_grad()
    ref_adn_loss(ref_model, x, y, 0.5, 1.0, 500).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        want = q.detach() - 0.1 * (q.grad if q.grad is not None else torch.zeros_like(q))
        torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12, msg=n)


def test_clipping_bounds_the_global_gradient_norm():
    model = tiny_model()
    x, y = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = train_step(model, opt, x, y, StepConfig(), clip_grad=1e-3)
    assert out["grad_norm"] > 1e-3
    total = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    assert total.item() == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "distill"}, "mode"),
        ({"mode": "single"}, "skip"),
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_step_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepConfig(**kwargs)
