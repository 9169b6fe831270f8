"""Parameter groups and schedules against hand-computed values."""

import math

import pytest
import torch
import torch.nn as nn

from mimkit.optim import (OptimConfig, Schedule, apply_schedule, cosine_schedule, layer_id, param_groups,
                          resolve_lr, step_schedule)


class TinyViTNames(nn.Module):
    """Parameter names as timm's ViT / BEiT has them, depth 2."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 4, 2, 2)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.norm1 = nn.LayerNorm(4)
            blk.attn = nn.Module()
            blk.attn.qkv = nn.Linear(4, 12)
            blk.attn.relative_position_bias_table = nn.Parameter(torch.zeros(7, 2))
            blk.gamma_1 = nn.Parameter(torch.ones(4))
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_no_decay_on_biases_norms_tables_tokens_gammas():
    model = TinyViTNames()
    groups = param_groups(model, weight_decay=0.05)
    assert len(groups) == 2
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {id(p) for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    for p in (model.cls_token, model.mask_token, model.pos_embed, model.patch_embed.proj.bias,
              model.blocks[0].norm1.weight, model.blocks[0].attn.qkv.bias,
              model.blocks[1].attn.relative_position_bias_table, model.blocks[1].gamma_1, model.head.bias):
        assert id(p) in no_decay
    for p in (model.patch_embed.proj.weight, model.blocks[0].attn.qkv.weight, model.head.weight):
        assert id(p) in decay
    # frozen parameters stay out of the optimizer
    assert id(model.frozen.weight) not in no_decay | decay


def test_layer_ids():
    assert layer_id("cls_token", 12) == 0
    assert layer_id("encoder.patch_embed.proj.weight", 12) == 0
    assert layer_id("encoder.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("blocks.11.mlp.fc1.weight", 12) == 12
    assert layer_id("head.weight", 12) == 13
    assert layer_id("encoder.norm.weight", 12) == 13
    # a head's own blocks are not encoder blocks
    assert layer_id("cls_head_blocks.0.attn.qkv.weight", 12) == 13


def test_layer_decay_scales():
    model = TinyViTNames()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, num_layers=2)
    # scale = 0.5 ** (L + 1 - i) with L = 2
    assert _group_of(groups, model.patch_embed.proj.weight)["lr_scale"] == pytest.approx(0.125)
    assert _group_of(groups, model.cls_token)["lr_scale"] == pytest.approx(0.125)
    assert _group_of(groups, model.blocks[0].attn.qkv.weight)["lr_scale"] == pytest.approx(0.25)
    assert _group_of(groups, model.blocks[1].attn.qkv.weight)["lr_scale"] == pytest.approx(0.5)
    assert _group_of(groups, model.head.weight)["lr_scale"] == pytest.approx(1.0)
    assert _group_of(groups, model.blocks[1].gamma_1)["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(model, 0.05, layer_decay=0.5)


def test_cosine_schedule_values():
    # warmup 4 steps to 1.0: 0.25, 0.5, 0.75, 1.0
    assert [cosine_schedule(s, 1.0, 4, 14, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # then cosine over 10 steps: step 4 -> base, step 9 (half way) -> mean, step 14 -> final
    assert cosine_schedule(4, 1.0, 4, 14, 0.1) == pytest.approx(1.0)
    assert cosine_schedule(9, 1.0, 4, 14, 0.1) == pytest.approx(0.55)
    assert cosine_schedule(6, 1.0, 4, 14, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert cosine_schedule(14, 1.0, 4, 14, 0.1) == pytest.approx(0.1)
    assert cosine_schedule(100, 1.0, 4, 14, 0.1) == pytest.approx(0.1)


def test_lr_batch_rule_is_explicit():
    assert resolve_lr(1.5e-4, 4096, 256) == pytest.approx(2.4e-3)
    assert resolve_lr(1.5e-3, 512, 0) == 1.5e-3  # BEiT never scales
    sched = Schedule.from_config(OptimConfig(lr=1e-3, base_batch_size=256, warmup_steps=0, min_lr=0.0),
                                 total_steps=10, global_batch=64)
    assert sched.lr == pytest.approx(2.5e-4)


def test_apply_schedule_honours_scales_and_weight_decay_schedule():
    model = TinyViTNames()
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, num_layers=2)
    opt = torch.optim.AdamW(groups, lr=0.0)
    sched = Schedule(lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10, weight_decay=0.04,
                     weight_decay_end=0.4)
    apply_schedule(opt, sched.lr_at(0), sched.weight_decay_at(5))
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.125, 0.25, 0.5, 1.0])
    wds = sorted({round(g["weight_decay"], 9) for g in opt.param_groups})
    assert wds == pytest.approx([0.0, 0.22])  # half-way along 0.04 -> 0.4


def test_step_schedule_warms_up_then_drops_tenfold_at_each_milestone():
    # ViTDet's COCO recipe on 1000 steps: warmup 10, x0.1 at steps 889 and 963
    lrs = [step_schedule(s, 1e-4, 10, 1000, 0.0) for s in range(1000)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[9] == pytest.approx(1e-4)
    assert lrs[888] == pytest.approx(1e-4) and lrs[889] == pytest.approx(1e-5)
    assert lrs[962] == pytest.approx(1e-5) and lrs[963] == pytest.approx(1e-6) and lrs[999] == pytest.approx(1e-6)
    assert step_schedule(999, 1e-4, 10, 1000, 5e-6) == 5e-6  # never below the floor
