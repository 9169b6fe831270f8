"""Decoders for visible-only encoders: positions land where they belong, the prompting decoder never
updates visible tokens (they are keys / values only), the MAE decoder does."""

import torch

from mimkit.data.masking import random_masking
from mimkit.models.decoders import MAEDecoder, PromptingDecoder, masked_ids

GRID, ENC_DIM, OUT_DIM = (4, 4), 48, 24


def _inputs(batch=3, keep=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_keep, mask, _ = random_masking(batch, GRID[0] * GRID[1], 1 - keep / 16, generator=g)
    latent = torch.randn(batch, 1 + keep, ENC_DIM, generator=g)
    return latent, ids_keep, mask


def _decoder(cls, depth=2):
    torch.manual_seed(0)
    return cls(ENC_DIM, GRID, OUT_DIM, dim=32, depth=depth, num_heads=4, mlp_ratio=2.0)


def test_masked_ids_complement_visible_ids():
    _, ids_keep, mask = _inputs()
    ids_masked = masked_ids(ids_keep, 16)
    assert ids_masked.shape == (3, 12)
    assert torch.equal(torch.zeros_like(mask).scatter(1, ids_masked, True), mask)


def test_output_covers_every_position_in_patch_order():
    """depth 0: each output is pred(norm(input + its own position)); checks the scatter to patch order."""
    latent, ids_keep, mask = _inputs()
    for cls in (MAEDecoder, PromptingDecoder):
        dec = _decoder(cls, depth=0)
        out = dec(latent, ids_keep)
        assert out.shape == (3, 1 + 16, OUT_DIM)
        pos = dec.pos_embed[0]                                        # [1+N, D]
        b, j = 1, 2
        patch = ids_keep[b, j]
        expected_visible = dec.predict(dec.embed(latent[b, 1 + j]) + pos[1 + patch])
        torch.testing.assert_close(out[b, 1 + patch], expected_visible)
        torch.testing.assert_close(out[b, 0], dec.predict(dec.embed(latent[b, 0]) + pos[0]))
        masked_patch = mask[b].nonzero()[0, 0]
        expected_masked = dec.predict(dec.mask_token[0, 0] + pos[1 + masked_patch])
        torch.testing.assert_close(out[b, 1 + masked_patch], expected_masked)


def test_prompting_decoder_leaves_visible_states_unchanged():
    latent, ids_keep, mask = _inputs()
    dec = _decoder(PromptingDecoder)
    states = dec.forward_states(latent, ids_keep)                      # [B, 1+N, D]
    prompts, _ = dec.embed_tokens(latent, ids_keep)                    # [B, 1+K, D]
    visible_states = torch.cat([states[:, :1], states[:, 1:].gather(1, ids_keep[..., None].expand(-1, -1, 32))], 1)
    torch.testing.assert_close(visible_states, prompts, rtol=0, atol=0)
    masked_states = states[:, 1:][mask].view(3, 12, 32)
    _, masked_in = dec.embed_tokens(latent, ids_keep)
    assert (masked_states - masked_in).abs().amax() > 1e-3             # mask tokens are updated


def test_prompts_are_read_by_mask_tokens_but_not_by_each_other():
    latent, ids_keep, mask = _inputs()
    dec = _decoder(PromptingDecoder)
    base = dec(latent, ids_keep)
    bumped = latent.clone()
    bumped[:, 1] += 1.0                                                # change the first visible token only
    out = dec(bumped, ids_keep)
    changed = (out - base).abs().amax(-1) > 1e-5                       # [B, 1+N]
    first_visible = ids_keep[:, 0]
    for b in range(3):
        expected_visible_change = torch.zeros(17, dtype=torch.bool)
        expected_visible_change[1 + first_visible[b]] = True
        visible_positions = torch.cat([torch.tensor([0]), 1 + ids_keep[b]])
        assert torch.equal(changed[b, visible_positions], expected_visible_change[visible_positions])
        assert changed[b, 1:][mask[b]].all()                           # every mask token read the prompt


def test_mae_decoder_updates_visible_tokens():
    latent, ids_keep, mask = _inputs()
    dec = _decoder(MAEDecoder)
    base = dec(latent, ids_keep)
    bumped = latent.clone()
    bumped[:, 1] += 1.0
    changed = (dec(bumped, ids_keep) - base).abs().amax(-1) > 1e-5
    assert changed[:, 0].all()                                         # CLS reads the visible token


def test_gradients_reach_every_parameter():
    latent, ids_keep, _ = _inputs()
    for cls in (MAEDecoder, PromptingDecoder):
        dec = _decoder(cls)
        dec(latent, ids_keep).square().mean().backward()
        missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, f"{cls.__name__}: no gradient for {missing}"
