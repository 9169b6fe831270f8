import math

import pytest
import timm
import torch

from mimkit.checkpoint.timm_layout import to_timm_beit_state_dict
from mimkit.models.pos_embed import (num_relative_distances, relative_position_index, resize_abs_pos_embed,
                                     resize_rel_pos_table, sincos_2d)
from mimkit.models.vit import ViTConfig, VisionTransformer, preset
from mimkit.optim import layer_id, param_groups

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def _randomize_zero_inits(model: VisionTransformer, seed: int = 0) -> None:
    """Rel-pos tables and q/v biases start at zero: give them values so comparisons can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")) or "gamma" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("num_classes", [0, 5])
def test_plain_config_loads_into_timm_vit_with_same_output(num_classes):
    torch.manual_seed(0)
    ours = VisionTransformer(ViTConfig(**TINY, num_classes=num_classes)).eval()
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=num_classes, **TINY).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rel_pos", ["block", "shared"])
def test_beit_config_converts_into_timm_beit_with_same_output(rel_pos):
    torch.manual_seed(0)
    cfg = ViTConfig(**TINY, qkv_bias="qv", pos_embed="none", rel_pos=rel_pos, layer_scale_init=0.1,
                    global_pool="avg", num_classes=5, rescale_init=True)
    ours = VisionTransformer(cfg).eval()
    _randomize_zero_inits(ours)
    ref = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=5,
                            use_rel_pos_bias=rel_pos == "block", use_shared_rel_pos_bias=rel_pos == "shared",
                            **TINY).eval()
    ref.load_state_dict(to_timm_beit_state_dict(ours.state_dict()), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_q_and_v_biases_change_the_output_and_there_is_no_k_bias():
    model = VisionTransformer(ViTConfig(**TINY, qkv_bias="qv")).eval()
    names = set(model.state_dict())
    assert "blocks.0.attn.q_bias" in names and "blocks.0.attn.v_bias" in names
    assert "blocks.0.attn.qkv.bias" not in names and not any("k_bias" in n for n in names)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].attn.q_bias.normal_()
        assert not torch.allclose(before, model(x))


@pytest.mark.parametrize("rel_pos", ["shared", "block"])
def test_attention_probs_are_the_weights_the_forward_applies(rel_pos):
    """attention_probs is the softmax the forward's SDPA uses: those weights times v, through proj, give
    the forward's output, with the shared and the block's own rel-pos bias, all tokens or visible ones."""
    torch.manual_seed(0)
    model = VisionTransformer(preset("beit_tiny_cpu", rel_pos=rel_pos)).eval()
    _randomize_zero_inits(model)
    x = torch.randn(2, 17, 64)
    blk = model.blocks[-1]
    attn = blk.attn
    token_index = torch.tensor([[0, 1, 4, 9, 16], [0, 2, 3, 10, 15]])   # CLS + 4 kept patches (index coordinates)
    for tokens, index in ((x, None), (x[:, :5], token_index)):
        shared = model.rel_pos_bias(index, True) if model.rel_pos_bias is not None else None
        with torch.no_grad():
            probs = attn.attention_probs(tokens, shared, index)          # [B, H, L, L]
            _, _, v, _ = attn.qkv_and_bias(tokens, shared, index)
            B, L, D = tokens.shape
            by_hand = attn.proj((probs @ v).transpose(1, 2).reshape(B, L, D))
            expected = attn(tokens, shared, index)
        assert probs.shape == (2, 4, L, L) and probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, L))
        torch.testing.assert_close(by_hand, expected, atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # one query row (a teacher's CLS) is that row of the whole matrix
            torch.testing.assert_close(attn.attention_probs(tokens, shared, index, queries=slice(0, 1)), probs[:, :, :1])


def test_mask_token_replaces_only_masked_patches():
    torch.manual_seed(0)
    model = VisionTransformer(preset("beit_tiny_cpu")).eval()
    _randomize_zero_inits(model)
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 6]] = True
    with torch.no_grad():
        # No masked patch: identical to no mask at all.
        torch.testing.assert_close(model.forward_features(x, mask=torch.zeros_like(mask)), model.forward_features(x))
        # Embeddings differ from the unmasked ones exactly at masked rows (prefix row 0 untouched).
        diff = (model.embed(x, mask) - model.embed(x)).abs().sum(-1)[:, 1:]  # [B, N]
        assert torch.equal(diff > 0, mask)
        # The content of masked patches is invisible: changing it changes nothing.
        x2 = x.clone()
        x2[:, :, 0:8, 0:8] += 3.0  # patch 0
        x2[:, :, 8:16, 8:16] -= 2.0  # patch 5
        torch.testing.assert_close(model.forward_features(x2, mask=mask), model.forward_features(x, mask=mask))
        assert not torch.allclose(model.forward_features(x2), model.forward_features(x))


def test_visible_only_equals_encoding_the_gathered_patches():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**TINY, pos_embed="sincos")).eval()
    x = torch.randn(2, 3, 32, 32)
    ids_keep = torch.stack([torch.randperm(16)[:4] for _ in range(2)])  # [B, K]
    with torch.no_grad():
        out = model.forward_features(x, ids_keep=ids_keep)
        assert out.shape == (2, 1 + 4, 64)
        # Reference by hand: patch embeddings + positions, gather, cls (+ its position), blocks, norm.
        patches = model.patch_embed(x) + model.pos_embed[:, 1:]
        kept = torch.stack([patches[b, ids_keep[b]] for b in range(2)])
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1)
        ref = torch.cat([cls, kept], dim=1)
        for blk in model.blocks:
            ref = blk(ref)
        torch.testing.assert_close(out, model.norm(ref))


@pytest.mark.parametrize("rel_pos", ["block", "shared"])
def test_visible_only_with_relative_positions_follows_the_kept_positions(rel_pos):
    # Keeping every patch in a shuffled order must give the full encoding, shuffled the same way:
    # the attention bias has to follow each token's grid position, not its slot in the sequence.
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**TINY, qkv_bias="qv", pos_embed="none", rel_pos=rel_pos)).eval()
    _randomize_zero_inits(model)
    x = torch.randn(2, 3, 32, 32)
    ids_keep = torch.stack([torch.randperm(16) for _ in range(2)])
    with torch.no_grad():
        full = model.forward_features(x)
        shuffled = model.forward_features(x, ids_keep=ids_keep)
    expected = torch.cat([full[:, :1], torch.stack([full[b, 1:][ids_keep[b]] for b in range(2)])], dim=1)
    torch.testing.assert_close(shuffled, expected, rtol=1e-5, atol=1e-5)


def test_window_attention_pads_an_uneven_grid_and_stays_local():
    torch.manual_seed(0)
    # 40 px / 8 = a 5x5 grid, windows of 2: padded to 6x6.
    cfg = ViTConfig(img_size=40, patch_size=8, embed_dim=64, depth=3, num_heads=4, class_token=False,
                    window_size=2, global_blocks=[2], rel_pos="block", pos_embed="learned")
    model = VisionTransformer(cfg).eval()
    _randomize_zero_inits(model)
    assert model.blocks[0].attn.relative_position_bias_table.shape == (num_relative_distances((2, 2)), 4)
    assert model.blocks[2].attn.relative_position_bias_table.shape == (num_relative_distances((5, 5)), 4)
    x = torch.randn(1, 3, 40, 40)
    x2 = x.clone()
    x2[:, :, 0:8, 0:8] += 5.0  # patch (0, 0): window (0, 0) holds patches (0,0) (0,1) (1,0) (1,1)
    with torch.no_grad():
        final, (first, last_windowed) = model.forward_intermediates(x, [0, 1])
        final2, (first2, _) = model.forward_intermediates(x2, [0, 1])
    assert final.shape == (1, 25, 64) and torch.isfinite(final).all()
    changed = ((first2 - first).abs().sum(-1) > 1e-6).reshape(5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(changed, expected)
    # The global block spreads the change everywhere.
    assert ((final2 - final).abs().sum(-1) > 1e-6).all()


def test_window_attention_rejects_class_token():
    with pytest.raises(ValueError, match="class_token"):
        VisionTransformer(ViTConfig(**TINY, window_size=2))


def test_intermediates_count_shapes_and_final_norm():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, [1, 3])
        assert len(inter) == 2 and all(t.shape == (2, 17, 64) for t in inter)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.norm(inter[-1]), final)
        assert not torch.allclose(inter[0], inter[1])
        _, last_two = model.forward_intermediates(x, 2)
        torch.testing.assert_close(last_two[1], inter[1])
        assert model.patch_tokens_to_map(inter[0]).shape == (2, 64, 4, 4)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = ViTConfig(**TINY, qkv_bias="qv", rel_pos="shared", layer_scale_init=0.1, num_classes=3)
    plain = VisionTransformer(cfg).train()
    _randomize_zero_inits(plain)
    ckpt = VisionTransformer(ViTConfig(**TINY, qkv_bias="qv", rel_pos="shared", layer_scale_init=0.1,
                                       num_classes=3, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert plain.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0


def test_rescale_init_shrinks_deeper_residual_projections():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(embed_dim=128, depth=4, num_heads=4, img_size=32, patch_size=8,
                                        rescale_init=True))
    stds = [blk.mlp.fc2.weight.std().item() for blk in model.blocks]
    for layer_id, s in enumerate(stds, start=1):
        assert s == pytest.approx(0.02 / math.sqrt(2 * layer_id), rel=0.1)


def test_optim_rules_on_the_real_vit_names():
    # mimkit.optim owns the rules; here they meet the ViT's own parameter names (test_optim uses stand-ins).
    model = VisionTransformer(ViTConfig(**TINY, rel_pos="block", mask_token=True))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, num_layers=model.cfg.depth)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_tables = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"] if p.ndim > 1}
    assert no_decay_tables == {"cls_token", "mask_token", "pos_embed", "blocks.0.attn.relative_position_bias_table",
                               "blocks.1.attn.relative_position_bias_table"}
    assert layer_id("pos_embed", 2) == 0 and layer_id("blocks.1.mlp.fc1.weight", 2) == 2
    assert layer_id("head.weight", 2) == 3


def test_sincos_matches_the_mae_layout():
    table = sincos_2d(8, 2, 3, cls_token=True)  # [1 + 6, 8]
    assert table.shape == (7, 8) and torch.all(table[0] == 0)
    # Patch (row 1, col 2) is row-major index 5 -> table row 6. First half: column, second half: row.
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float64) / 2)
    col, row = 2 * omega, 1 * omega
    expected = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()]).float()
    torch.testing.assert_close(table[6], expected)


def test_relative_position_index_layout():
    index = relative_position_index((2, 3))
    n, num = 6, num_relative_distances((2, 3))
    assert index.shape == (n + 1, n + 1) and num == 3 * 5 + 3
    assert index[0, 0] == num - 1 and torch.all(index[0, 1:] == num - 3) and torch.all(index[1:, 0] == num - 2)
    centre = (2 - 1) * 5 + (3 - 1)  # offset (0, 0)
    assert torch.all(index[1:, 1:].diagonal() == centre)
    assert index[1:, 1:].max() < num - 3 and len(index[1:, 1:].unique()) == 3 * 5


def test_resizing_tables_keeps_what_it_must():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_abs_pos_embed(pos, (4, 4), (4, 4), 1) is pos
    big = resize_abs_pos_embed(pos, (4, 4), (6, 6), 1)
    assert big.shape == (1, 1 + 36, 8) and torch.equal(big[:, :1], pos[:, :1])
    const = torch.full((1, 16, 8), 0.3)
    torch.testing.assert_close(resize_abs_pos_embed(const, (4, 4), (6, 5), 0), torch.full((1, 30, 8), 0.3))

    table = torch.randn(num_relative_distances((4, 4)), 3)
    new = resize_rel_pos_table(table, (4, 4), (6, 6))
    assert new.shape == (num_relative_distances((6, 6)), 3)
    torch.testing.assert_close(new[-3:], table[-3:])
    # Offset (0, 0) sits at the centre of both grids and is kept exactly (align_corners).
    torch.testing.assert_close(new[5 * 11 + 5], table[3 * 7 + 3])


def test_config_is_an_omegaconf_section_and_sincos_is_a_saved_buffer():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(ViTConfig)
    merged = OmegaConf.merge(schema, OmegaConf.create({"global_blocks": [2, 5], "layer_scale_init": 0.1}))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ViTConfig) and cfg.global_blocks == [2, 5] and cfg.layer_scale_init == 0.1
    with pytest.raises(Exception):
        OmegaConf.merge(schema, OmegaConf.create({"depth": "deep"}))
    model = VisionTransformer(ViTConfig(**TINY, pos_embed="sincos"))
    assert "pos_embed" in model.state_dict() and "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(64, 4, 4, cls_token=True))
    with pytest.raises(ValueError, match="qkv_bias"):
        VisionTransformer(ViTConfig(**TINY, qkv_bias="kv"))
