"""The LR schedule against values worked out by hand, including a fixed-lr group (SimSiam's predictor)."""
import math

import pytest
import torch

from utils.optim import LRSchedule, build_optimizer


def test_warmup_cosine_and_fixed_groups_by_hand():
    scheduled, fixed = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([{"params": [scheduled], "lr_scale": 1.0},
                           {"params": [fixed], "lr_scale": 2.0, "fixed_lr": True}],
                          name="sgd", lr=0.1, weight_decay=0.0, momentum=0.9, betas=(0.9, 0.999))
    schedule = LRSchedule(opt, base_lr=0.1, total_steps=12, warmup_steps=2, min_lr=0.0)
    seen = []
    for _ in range(12):
        schedule.apply()
        seen.append([g["lr"] for g in opt.param_groups])
        schedule.advance()
    # warm-up: 0.1 * 1/2, 0.1 * 2/2; then cosine over 10 steps: 0.05 * (1 + cos(pi * t / 10))
    expected = [0.05, 0.1] + [0.05 * (1 + math.cos(math.pi * t / 10)) for t in range(10)]
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert [s[1] for s in seen] == pytest.approx([0.2] * 12)


def test_step_schedule_divides_the_lr_every_step_every_iterations_after_warmup():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([{"params": [param]}], name="sgd", lr=0.1, weight_decay=0.0, momentum=0.9,
                          betas=(0.9, 0.999))
    schedule = LRSchedule(opt, base_lr=0.1, total_steps=10, warmup_steps=1, schedule="step", step_every=3,
                          step_factor=0.5)
    seen = []
    for _ in range(10):
        schedule.apply()
        seen.append(opt.param_groups[0]["lr"])
        schedule.advance()
    # warm-up 0.1 * 1/1, then 3 steps at 0.1, 3 at 0.05, 3 at 0.025
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025])
    with pytest.raises(ValueError, match="step_every"):
        LRSchedule(opt, base_lr=0.1, total_steps=10, warmup_steps=0, schedule="step")


@pytest.mark.parametrize("name, kind, settings", [
    ("sgd", torch.optim.SGD, {"momentum": 0.8}),
    ("adam", torch.optim.Adam, {"betas": (0.7, 0.95)}),
    ("adamw", torch.optim.AdamW, {"betas": (0.7, 0.95)}),
    ("rmsprop", torch.optim.RMSprop, {"alpha": 0.9, "momentum": 0}),   # DCCM's: squared-gradient decay 0.9
])
def test_each_optimizer_gets_its_settings_and_each_group_its_own(name, kind, settings):
    """The optimizer `name` names, with the config's momentum or betas; a group's lr_scale and weight_decay
    override the base ones, and frozen parameters (and a group left without any) are not handed over."""
    trained, scaled, frozen = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    frozen.requires_grad_(False)
    opt = build_optimizer([{"params": [trained, frozen]}, {"params": [scaled], "lr_scale": 10.0, "weight_decay": 0.0},
                           {"params": [frozen]}],
                          name=name, lr=0.01, weight_decay=1e-4, momentum=0.8, betas=(0.7, 0.95))
    assert type(opt) is kind
    assert {key: opt.defaults[key] for key in settings} == settings
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [[id(trained)], [id(scaled)]]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.01, 1e-4), (pytest.approx(0.1), 0.0)]


def test_a_step_every_iteration_is_allowed():
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], name="sgd", lr=0.1, weight_decay=0.0,
                          momentum=0.9, betas=(0.9, 0.999))
    schedule = LRSchedule(opt, base_lr=0.1, total_steps=3, warmup_steps=0, schedule="step", step_every=1,
                          step_factor=0.5)
    assert [schedule.lr_at(step) for step in range(3)] == pytest.approx([0.1, 0.05, 0.025])
