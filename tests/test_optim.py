"""The matrix optimizers of bov.optim: what each step does, its schedules, and that a saved state resumes exactly."""

import copy

import pytest
import torch

from bov.config import load_config
from bov.optim import NorMuon, build_optimizer, normuon_momentum, polar_express


@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_polar_express_is_close_to_the_polar_factor(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    x = polar_express(g)
    s = torch.linalg.svdvals(x)
    assert 0.8 < s.min() and s.max() < 1.2  # nanochat's safety-factor iteration lands near, not on, 1
    cos = (x * (u @ vt)).sum() / (x.norm() * (u @ vt).norm())
    assert cos > 0.99


def test_normuon_momentum_and_weight_decay_schedules():
    assert normuon_momentum(0, 1000, 0.65) == pytest.approx(0.85)
    assert normuon_momentum(200, 1000, 0.65) == pytest.approx(0.91)
    assert normuon_momentum(500, 1000, 0.65) == pytest.approx(0.97)  # warmed up, not yet decaying
    assert normuon_momentum(825, 1000, 0.65) == pytest.approx(0.935)  # halfway through the decay
    assert normuon_momentum(1000, 1000, 0.65) == pytest.approx(0.90)
    assert normuon_momentum(300, 366, 0.35) == pytest.approx(0.94)  # a short run is still warming up


def _one_step(p0, grad, lr=1.0, wd=0.0, total=100, beta2=0.95):
    p = torch.nn.Parameter(p0.clone())
    opt = NorMuon([p], lr=lr, weight_decay=wd, total_steps=total, decay_start=0.5, beta2=beta2)
    p.grad = grad.clone()
    opt.step()
    return p.detach() - p0, opt


@pytest.mark.parametrize("shape", [(96, 32), (32, 96)])
def test_normuon_first_update_equalizes_neurons_and_keeps_the_orthogonalized_norm(shape):
    torch.manual_seed(0)
    grad = torch.randn(*shape) * torch.linspace(0.1, 3.0, shape[0])[:, None]  # rows of very different scale
    delta, _ = _one_step(torch.zeros(*shape), grad)
    rows, cols = shape
    u = -delta / max(1.0, rows / cols) ** 0.5  # undo the LR's shape scaling
    # the first momentum step is 0.15 * grad; Nesterov mixes in 0.85 * that; orthogonalization removes the scale
    ortho = polar_express((1 - 0.85) * grad * (1 + 0.85))
    assert float(u.norm()) == pytest.approx(float(ortho.norm()), rel=1e-4)
    neuron_norms = u.norm(dim=1) if rows >= cols else u.norm(dim=0)  # per row of a tall, per column of a wide
    assert torch.allclose(neuron_norms, neuron_norms.mean().expand_as(neuron_norms), rtol=1e-4)
    plain = ortho.norm(dim=1) if rows >= cols else ortho.norm(dim=0)
    assert plain.std() / plain.mean() > 0.05  # so the equalization above is NorMuon's doing


def test_normuon_weight_decay_is_cautious_and_decays_to_zero():
    torch.manual_seed(0)
    p0 = torch.randn(16, 16)
    grad = torch.randn(16, 16)
    lr, wd = 0.01, 0.5
    with_wd, _ = _one_step(p0, grad, lr=lr, wd=wd)
    without, _ = _one_step(p0, grad, lr=lr, wd=0.0)
    decay = with_wd - without  # -lr * wd * p where the update (-delta) and p agree in sign, else 0
    u = -without / lr
    agree = (u * p0) >= 0
    assert 0 < agree.sum() < agree.numel()
    assert torch.allclose(decay[agree], -lr * wd * p0[agree], atol=1e-7)
    assert torch.all(decay[~agree] == 0)
    # at the last step the cosine has brought the decay to zero
    p = torch.nn.Parameter(p0.clone())
    opt = NorMuon([p], lr=lr, weight_decay=wd, total_steps=10, decay_start=0.5)
    opt.param_groups[0]["step"] = 10
    ref = torch.nn.Parameter(p0.clone())
    ref_opt = NorMuon([ref], lr=lr, weight_decay=0.0, total_steps=10, decay_start=0.5)
    ref_opt.param_groups[0]["step"] = 10
    p.grad, ref.grad = grad.clone(), grad.clone()
    opt.step()
    ref_opt.step()
    assert torch.allclose(p, ref, atol=1e-7)


def test_a_saved_normuon_and_adamw_state_resumes_the_same_trajectory():
    cfg = load_config("micro", "bov", {"train.optimizer": "normuon", "train.lr_matrix": 0.02,
                                       "train.weight_decay": 0.1})
    from bov.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model)
    batches = [torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1)) for _ in range(6)]

    def steps(m, opt, bs):
        for b in bs:
            opt.zero_grad()
            m(b[:, :-1], targets=b[:, 1:]).mean().backward()
            opt.step()

    straight = copy.deepcopy(model)
    opt = build_optimizer(straight.param_groups(), cfg.train, total_steps=6)
    steps(straight, opt, batches)

    first = copy.deepcopy(model)
    opt1 = build_optimizer(first.param_groups(), cfg.train, total_steps=6)
    steps(first, opt1, batches[:3])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed.param_groups(), cfg.train, total_steps=6)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["step"] == 3  # the schedule's position came back with the state
    steps(resumed, opt2, batches[3:])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shape", [(128, 128), (512, 128)])
def test_muon_s_bf16_newton_schulz_turns_one_rounding_into_a_percent(shape):
    """Why DDP with Muon matches one process only loosely (AdamW: to 1e-5): an all-reduce sums the ranks' gradients
    in another order, which changes float32 roundings, and now and then one of them crosses a bf16 rounding
    boundary. The smallest such change (one element, about 1e-9 of the gradient) moves Muon's bf16 Newton-Schulz
    update by 2-3%, and the same iteration in fp32 by about 1e-6. Float noise made large by bf16, not a bug: both
    updates are the polar factor to bf16's precision."""
    from bov.optim import POLAR_EXPRESS

    def in_fp32(g):
        x, tall = g / (g.norm() * 1.01 + 1e-6), g.size(-2) > g.size(-1)
        for a, b, c in POLAR_EXPRESS:
            m = x.mT @ x if tall else x @ x.mT
            x = a * x + (x @ (b * m + c * (m @ m)) if tall else (b * m + c * (m @ m)) @ x)
        return x

    torch.manual_seed(0)
    g = torch.randn(shape)
    up = torch.nextafter(g.bfloat16(), torch.full(shape, float("inf"), dtype=torch.bfloat16)).float()
    mid = (g.bfloat16().float() + up) / 2  # where bf16 rounding changes its mind
    i = int(((mid - g).abs() / g.abs()).flatten().argmin())
    h = g.clone().flatten()
    h[i] = torch.nextafter(mid.flatten()[i], torch.tensor(float("inf")))
    h = h.view(shape)
    assert int((h.bfloat16() != g.bfloat16()).sum()) == 1
    moved = lambda f: ((f(g) - f(h)).norm() / f(g).norm()).item()  # noqa: E731
    assert moved(lambda x: x) < 1e-8
    assert moved(polar_express) > 1e-2
    assert moved(in_fp32) < 1e-5
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    for x in (g, h):
        assert torch.nn.functional.cosine_similarity(polar_express(x).flatten(), (u @ vt).flatten(), dim=0) > 0.97
