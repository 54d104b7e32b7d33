"""RSST: the lambda schedules and the decoupled growing penalty on P = M and not R."""

from __future__ import annotations

import math

import pytest
import torch

import rsst

E1 = math.e - 1.0


def expected_lambda(t: int, total: int, g: float, schedule: str, n: float) -> float:
    """ALGORITHM.md: lambda(t) = g * f((t+1)/T)."""
    u = (t + 1) / total
    f = {
        "x": u,
        "x^2": u**2,
        "x^3": u**3,
        "exp": (math.exp(u) - 1) / E1,
        "exp_custom": (math.exp(u) - 1) / E1,
        "exp_custom_exponents": (math.exp(u**n) - 1) / E1,
    }[schedule]
    return g * f


def test_schedules_are_the_six_documented_ones():
    assert set(rsst.SCHEDULES) == {"x", "x^2", "x^3", "exp", "exp_custom", "exp_custom_exponents"}


@pytest.mark.parametrize("schedule", sorted(rsst.SCHEDULES))
@pytest.mark.parametrize("g, total, n", [(1.0, 1000, 4), (0.5, 200, 2), (3.0, 10, 3)])
def test_reg_lambda_matches_formula_at_start_middle_end(schedule, g, total, n):
    for t in (0, total // 2 - 1, total - 1):
        got = rsst.reg_lambda(t, total, g, schedule, exponents=n)
        assert got == pytest.approx(expected_lambda(t, total, g, schedule, n), rel=1e-12, abs=1e-300), t
    assert rsst.reg_lambda(total - 1, total, g, schedule, exponents=n) == g  # reaches g exactly


@pytest.mark.parametrize("schedule", sorted(rsst.SCHEDULES))
def test_reg_lambda_middle_is_f_of_one_half(schedule):
    f_half = {
        "x": 0.5,
        "x^2": 0.25,
        "x^3": 0.125,
        "exp": (math.sqrt(math.e) - 1) / E1,
        "exp_custom": (math.sqrt(math.e) - 1) / E1,
        "exp_custom_exponents": (math.exp(0.5**4) - 1) / E1,
    }[schedule]
    assert rsst.reg_lambda(499, 1000, 2.0, schedule, exponents=4) == pytest.approx(2.0 * f_half, rel=1e-12)


@pytest.mark.parametrize("schedule", sorted(rsst.SCHEDULES))
def test_reg_lambda_grows_from_near_zero_to_g(schedule):
    g, total = 2.5, 1000
    lams = [rsst.reg_lambda(t, total, g, schedule, exponents=4) for t in range(total)]
    assert all(b >= a for a, b in zip(lams, lams[1:]))
    assert 0 <= lams[0] < g * 0.01
    if schedule == "x":
        assert lams[0] == pytest.approx(g / total)
    assert lams[-1] == g
    assert lams[total // 2] < g  # it grows over the state, not at once


@pytest.mark.parametrize("schedule", sorted(rsst.SCHEDULES))
def test_reg_lambda_stays_at_g_past_the_last_step(schedule):
    assert rsst.reg_lambda(150, 100, 0.7, schedule) == 0.7


# --------------------------------------------------------------------------- penalty
def make_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = {
        "a": torch.randn(8, 4, 3, 3, generator=g),
        "b": torch.randn(16, 8, generator=g),
        "c": torch.randn(5, generator=g),
    }
    penalty = {
        "a": (torch.rand(8, 4, 3, 3, generator=g) < 0.5).float(),
        "b": (torch.rand(16, 8, generator=g) < 0.3).float(),
        "c": torch.zeros(5),
    }
    return weights, penalty


def test_penalty_step_shrinks_only_penalized_weights():
    weights, penalty = make_case()
    lr0, g, total = 0.1, 2.0, 5
    pen = rsst.RSSTPenalty(weights, penalty, lr0=lr0, strength=g, schedule="x", exponents=4, end_step=total)
    assert pen.active
    for t in range(total):
        before = {n: w.clone() for n, w in weights.items()}
        lam = pen.step()
        assert lam == pytest.approx(rsst.reg_lambda(t, total, g, "x"))
        assert pen.last_lambda == lam
        assert pen.step_count == t + 1
        for n, w in weights.items():
            p = penalty[n] > 0
            assert torch.allclose(w[p], before[n][p] * (1 - lr0 * lam), rtol=1e-6, atol=0), n
            assert torch.equal(w[~p], before[n][~p]), n  # untouched, bit for bit


def test_penalty_updates_the_weights_in_place():
    weights, penalty = make_case()
    param = torch.nn.Parameter(weights["a"].clone())
    pen = rsst.RSSTPenalty(
        {"a": param}, {"a": penalty["a"]}, lr0=0.5, strength=1.0, schedule="x^2", exponents=4, end_step=3
    )
    pen.step()
    pen.step()
    assert not torch.equal(param.detach(), weights["a"])


def test_penalty_resumes_from_a_given_step():
    weights, penalty = make_case()
    pen = rsst.RSSTPenalty(weights, penalty, lr0=0.1, strength=1.0, schedule="exp", exponents=4, end_step=100, step=40)
    assert pen.current_lambda() == rsst.reg_lambda(40, 100, 1.0, "exp")
    assert pen.step() == rsst.reg_lambda(40, 100, 1.0, "exp")
    assert pen.step_count == 41


@pytest.mark.parametrize("schedule", sorted(rsst.SCHEDULES))
def test_penalized_norm_falls_monotonically(schedule):
    weights, penalty = make_case(seed=1)
    pen = rsst.RSSTPenalty(weights, penalty, lr0=0.1, strength=5.0, schedule=schedule, exponents=2, end_step=50)
    expected_start = math.sqrt(sum(float((w * penalty[n]).pow(2).sum()) for n, w in weights.items()))
    norms = [pen.penalized_norm()]
    assert norms[0] == pytest.approx(expected_start, rel=1e-5)
    for _ in range(50):
        pen.step()
        norms.append(pen.penalized_norm())
    assert all(b < a for a, b in zip(norms, norms[1:]))
    assert norms[-1] < norms[0]


def test_all_zero_penalty_mask_is_inactive():
    weights, _ = make_case()
    before = {n: w.clone() for n, w in weights.items()}
    pen = rsst.RSSTPenalty(
        weights,
        {n: torch.zeros_like(w) for n, w in weights.items()},
        lr0=0.1,
        strength=1.0,
        schedule="x",
        exponents=4,
        end_step=10,
    )
    assert not pen.active
    assert pen.penalized_norm() == 0.0
    for _ in range(3):
        pen.step()
    assert pen.step_count == 3
    assert all(torch.equal(weights[n], before[n]) for n in weights)


def test_norm_penalty_targets_bn_of_dropped_channels_and_remove_zeroes_them():
    import pruning_utils as pu
    from models import create_model

    torch.manual_seed(0)
    model = create_model("res20s", 10, 32, width=4)
    groups = pu.channel_groups(model)
    assert all(g.norm is not None for g in groups)
    modules = dict(model.named_modules())
    weights = pu.prunable_weights(model)
    penalty = {n: torch.zeros_like(w) for n, w in weights.items()}
    g = groups[0]
    penalty[g.layer][1] = 1.0  # channel 1 of the first prunable conv is being dropped
    extra = rsst.norm_penalty(groups, modules, penalty)
    bn = modules[g.norm]
    assert [t for t, _ in extra] == [bn.weight, bn.bias]
    assert extra[0][1].tolist() == [0.0, 1.0, 0.0, 0.0]
    with torch.no_grad():
        bn.bias.fill_(0.5)
    pen = rsst.RSSTPenalty(weights, penalty, 0.1, 1.0, "x", 4, 10, extra=extra)
    before = bn.weight.detach().clone()
    pen.step()
    assert bn.weight[1] < before[1] and torch.equal(bn.weight[[0, 2, 3]], before[[0, 2, 3]])
    norm_before = pen.penalized_norm()
    assert norm_before == pytest.approx(float(weights[g.layer][1].detach().norm()))  # BN not counted in P's norm
    pen.remove()
    assert (
        float(bn.weight[1].detach()) == 0.0 and float(bn.bias[1].detach()) == 0.0 and float(bn.bias[0].detach()) == 0.5
    )
    assert float(weights[g.layer][1].detach().abs().sum()) == 0.0


# ------------------------------------------------------------------------ calibration
def pure_decay(weights: dict, penalty: dict, pen: rsst.RSSTPenalty, steps: int) -> float:
    """Run `steps` penalty steps with no gradient; the penalized norm relative to the start."""
    start = pen.penalized_norm()
    for _ in range(steps):
        pen.step()
    return pen.penalized_norm() / start


@pytest.mark.parametrize("schedule", sorted(rsst.SCHEDULES))
@pytest.mark.parametrize("lr0", [1e-3, 0.1])
@pytest.mark.parametrize("end_step", [3, 40, 1000])
def test_calibrated_strength_reaches_the_target_ratio_by_pure_decay(schedule, lr0, end_step):
    target = 1e-3
    g = rsst.calibrate_strength(end_step, lr0, target, schedule, exponents=4)
    assert 0 < lr0 * g < 1  # never a full step: no weight zeroed or flipped in one step
    assert rsst.pure_decay_ratio(end_step, lr0, g, schedule, 4) == pytest.approx(target, rel=1e-6)
    weights, penalty = make_case()
    weights = {n: w.double() for n, w in weights.items()}
    penalty = {n: p.double() for n, p in penalty.items()}
    pen = rsst.RSSTPenalty(weights, penalty, lr0, g, schedule, 4, end_step)
    assert pen.planned_ratio() == 1.0
    assert pure_decay(weights, penalty, pen, end_step) == pytest.approx(target, rel=1e-6)
    assert pen.done and pen.last_lambda == pytest.approx(g)
    assert pen.planned_ratio() == pytest.approx(target, rel=1e-6)  # what the trace plots as planned


def test_calibrated_shrink_per_step_is_the_same_for_any_lr0():
    """The calibrated penalty is a property of the schedule and step count, not of the optimizer."""
    a = rsst.calibrate_strength(500, 1e-3, 1e-3, "exp_custom_exponents", 4)
    b = rsst.calibrate_strength(500, 0.1, 1e-3, "exp_custom_exponents", 4)
    assert a * 1e-3 == pytest.approx(b * 0.1, rel=1e-9)


def test_penalty_does_nothing_after_its_end_step():
    weights, penalty = make_case()
    pen = rsst.RSSTPenalty(weights, penalty, 0.1, 1.0, "x", 4, end_step=4)
    for _ in range(4):
        pen.step()
    after = {n: w.clone() for n, w in weights.items()}
    assert pen.step() == 0.0 and pen.done and pen.step_count == 4
    assert all(torch.equal(after[n], weights[n]) for n in weights)
    assert pen.last_lambda == 1.0  # the peak reached, kept for the summary's final_lambda


@pytest.mark.parametrize(
    "reg_end, total, expected_end", [(0.5, 240, 120), (0.3, 10, 3), (0.7, 101, 71), (0.01, 20, 1), (1.0, 7, 7)]
)
def test_plan_removes_at_reg_end_of_the_state(reg_end, total, expected_end):
    plan = rsst.plan_penalty("calibrated", total, 0.1, 1.0, "exp_custom_exponents", 4, 1e-3, reg_end)
    assert plan.end_step == expected_end
    assert plan.predicted_ratio == pytest.approx(1e-3, rel=1e-6) and not plan.clamped


def test_plan_multiplier_scales_the_calibrated_strength_and_clamps():
    base = rsst.plan_penalty("calibrated", 200, 1e-3, 1.0, "x", 4)
    double = rsst.plan_penalty("calibrated", 200, 1e-3, 2.0, "x", 4)
    assert double.strength == pytest.approx(2 * base.strength)
    assert double.predicted_ratio < base.predicted_ratio
    huge = rsst.plan_penalty("calibrated", 200, 1e-3, 1e6, "x", 4)
    assert huge.clamped and all(rsst.shrink_factors(100, 1e-3, huge.strength, "x", 4) <= rsst.MAX_SHRINK)


@pytest.mark.parametrize("schedule", sorted(rsst.SCHEDULES))
def test_raw_mode_reproduces_the_previous_lambda(schedule):
    """--reg_mode raw: lambda(t) = g f((t+1)/T) over the whole state, removal at its end."""
    total, g = 60, 1.5
    plan = rsst.plan_penalty("raw", total, 1e-3, g, schedule, 4)
    assert plan.end_step == total and plan.strength == g
    weights, penalty = make_case()
    pen = rsst.RSSTPenalty(weights, penalty, 1e-3, plan.strength, schedule, 4, plan.end_step)
    lams = [pen.step() for _ in range(total)]
    assert lams == [pytest.approx(expected_lambda(t, total, g, schedule, 4), rel=1e-12) for t in range(total)]
    # the seed's CIFAR-100 ViT state: 28,080 steps at lr0 1e-3 keep ~1.2 % of the norm by pure decay
    assert rsst.pure_decay_ratio(28080, 1e-3, 1.0, "exp_custom_exponents", 4) == pytest.approx(0.012, abs=0.002)


# ---------------------------------------------------------------------- scaled updates
def fake_optimizer_step(weights: dict, t: int, signs: dict) -> None:
    """A stand-in for Adam: steps of fixed size that push each weight back toward the sign it
    started with (the loss wants the unit back), plus an alternating part; their size does not
    shrink with the weight, as Adam's normalized steps do not."""
    for n, w in weights.items():
        w.add_(1e-2 * signs[n] + 3e-3 * (-1) ** t * torch.cos(torch.arange(w.numel(), dtype=w.dtype)).view_as(w))


@pytest.mark.parametrize("schedule", ["x", "exp_custom_exponents"])
def test_scaled_updates_keep_p_at_rho_times_the_unpenalized_trajectory(schedule):
    """With scale_updates, P's weights are exactly rho(t) * z(t), z the weights with the same
    optimizer steps and no penalty; the other weights take the optimizer's steps unchanged."""
    weights, penalty = make_case(seed=2)
    weights = {n: w.double() for n, w in weights.items()}
    penalty = {n: p.double() for n, p in penalty.items()}
    z = {n: w.clone() for n, w in weights.items()}
    signs = {n: w.sign() for n, w in weights.items()}
    end, lr0 = 30, 1e-3
    g = rsst.calibrate_strength(end, lr0, 1e-3, schedule, 4)
    pen = rsst.RSSTPenalty(weights, penalty, lr0, g, schedule, 4, end, scale_updates=True)
    for t in range(end):
        fake_optimizer_step(weights, t, signs)
        fake_optimizer_step(z, t, signs)
        pen.step()
        rho = float(pen.rho[t + 1])
        for n in weights:
            p = penalty[n] > 0
            assert torch.allclose(weights[n][p], rho * z[n][p], rtol=1e-9, atol=1e-15), (n, t)
            assert torch.equal(weights[n][~p], z[n][~p]), (n, t)
    assert float(pen.rho[end]) == pytest.approx(1e-3, rel=1e-6)
    ratio = pen.penalized_norm() / math.sqrt(sum(float((z[n] * penalty[n]).pow(2).sum()) for n in z))
    assert ratio == pytest.approx(1e-3, rel=1e-6)


def test_without_scaled_updates_fixed_size_steps_hold_p_far_above_the_target():
    """What scale_updates is for: with steps of constant size, the plain decay stalls."""
    ratios = {}
    for scaled in (False, True):
        weights, penalty = make_case(seed=2)
        signs = {n: w.sign() for n, w in weights.items()}
        start = math.sqrt(sum(float((w * penalty[n]).pow(2).sum()) for n, w in weights.items()))
        end, lr0 = 200, 1e-3
        g = rsst.calibrate_strength(end, lr0, 1e-3, "exp_custom_exponents", 4)
        pen = rsst.RSSTPenalty(weights, penalty, lr0, g, "exp_custom_exponents", 4, end, scale_updates=scaled)
        for t in range(end):
            fake_optimizer_step(weights, t, signs)
            pen.step()
        ratios[scaled] = pen.penalized_norm() / start
    assert ratios[False] > 0.01 and ratios[True] < 0.01


def test_scaled_updates_resume_exactly_from_a_later_step():
    """A penalty rebuilt at step k on the weights of step k (a resume) continues bit for bit."""
    weights, penalty = make_case(seed=3)
    copy = {n: w.clone() for n, w in weights.items()}
    signs = {n: w.sign() for n, w in weights.items()}
    args = (0.1, 0.5, "exp", 4, 20)
    pen = rsst.RSSTPenalty(weights, penalty, *args, scale_updates=True)
    for t in range(20):
        if t == 7:  # the resumed run starts here from the saved weights
            resumed_w = {n: w.clone() for n, w in weights.items()}
            resumed = rsst.RSSTPenalty(resumed_w, penalty, *args, step=7, scale_updates=True)
        fake_optimizer_step(weights, t, signs)
        pen.step()
        if t >= 7:
            fake_optimizer_step(resumed_w, t, signs)
            resumed.step()
    assert all(torch.equal(weights[n], resumed_w[n]) for n in weights)
    assert not torch.equal(weights["a"], copy["a"])


def test_scaled_updates_change_nothing_without_optimizer_steps():
    out = []
    for scaled in (False, True):
        weights, penalty = make_case(seed=4)
        pen = rsst.RSSTPenalty(weights, penalty, 0.1, 2.0, "x^2", 4, 15, scale_updates=scaled)
        for _ in range(15):
            pen.step()
        out.append(weights)
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])


def test_scaled_updates_beat_a_real_adamw_that_pushes_back():
    """A real AdamW on a regression whose target needs the penalized inputs: unscaled, its
    normalized steps hold P at ~lr / (lr0 lambda), far above the target; scaled, P ends at the
    target times the growth of its unpenalized trajectory."""
    ratios = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        x = torch.randn(256, 16)
        y = x @ torch.randn(16, 1)
        w = torch.nn.Parameter(0.1 * torch.randn(1, 16))
        penalty = torch.zeros(1, 16)
        penalty[0, :6] = 1.0  # six inputs the regroup drops; the loss still wants them
        opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.05)
        end = 400
        g = rsst.calibrate_strength(end, 1e-3, 1e-3, "exp_custom_exponents", 4)
        pen = rsst.RSSTPenalty({"w": w}, {"w": penalty}, 1e-3, g, "exp_custom_exponents", 4, end, scale_updates=scaled)
        start = pen.penalized_norm()
        for _ in range(end):
            i = torch.randint(0, 256, (32,))
            loss = ((x[i] @ w.t() - y[i]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pen.step()
        ratios[scaled] = pen.penalized_norm() / start
    assert ratios[False] > 3e-2 and ratios[True] < 1e-2 and ratios[True] < ratios[False] / 10, ratios
