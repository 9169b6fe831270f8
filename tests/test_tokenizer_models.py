"""Tokenizer networks, the codebook and the tokenizer export, in one process (fast)."""

import math

import pytest
import torch

from mimkit.models.codebook import CodebookConfig, VectorQuantizer, kmeans, usage_stats
from mimkit.models.dvae import DALLE_MEAN, DALLE_STD, DiscreteVAE, DVAEConfig, cosine_ramp
from mimkit.models.vqgan import VQGAN, VQGANConfig
from mimkit.models.vqkd import VQKD, VQKDConfig, align_teacher_tokens, cosine_regression_loss
from mimkit.checkpoint.tokenizer_export import (
    build_tokenizer_model,
    load_tokenizer,
    save_random_tokenizer_export,
    save_tokenizer_export,
)

TINY_DVAE = DVAEConfig(vocab_size=64, n_hid=16, blocks_per_group=1, n_init=16,
                       temperature_steps=100, kl_warmup_steps=50)


def test_usage_stats_by_hand():
    stats = usage_stats(torch.tensor([2.0, 2.0, 0.0, 0.0]))
    assert stats["codebook_usage"] == 0.5
    assert stats["codebook_perplexity"] == pytest.approx(2.0)  # uniform over two codes
    assert usage_stats(torch.zeros(3))["codebook_usage"] == 0.0


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2) for c in centres])
    found, counts = kmeans(x, 3, iters=10, cosine=False)
    dist = torch.cdist(centres, found).min(1).values
    assert dist.max() < 0.5 and counts.sum() == 150


def test_quantizer_kmeans_init_uses_codes_and_commits():
    torch.manual_seed(0)
    vq = VectorQuantizer(CodebookConfig(num_codes=16, dim=8, kmeans_init=True, restart_dead=False)).train()
    z = torch.randn(4, 32, 8, requires_grad=True)
    z_q, ids, commit = vq(z)
    assert z_q.shape == z.shape and ids.shape == (4, 32)
    assert bool(vq.initialized)
    assert vq.usage()["codebook_usage"] > 0.8  # k-means puts every code on data
    (z_q.sum() + commit).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()  # straight-through + commitment
    vq.eval()
    assert torch.equal(vq.lookup(z.detach()), ids)


def test_dead_codes_are_restarted_onto_data():
    torch.manual_seed(0)
    cfg = CodebookConfig(num_codes=32, dim=4, kmeans_init=False, restart_dead=True, restart_every=5,
                         dead_threshold=1.0, decay=0.5)
    vq = VectorQuantizer(cfg).train()
    vq.embedding[1:] += 100.0  # every code but one far from the data: dead
    vq.ema_sum.copy_(vq.embedding)
    data = torch.randn(256, 4)
    for _ in range(5):
        vq(data)
    assert vq.restarts_total > 0
    vq.reset_usage()
    vq(data)
    assert vq.usage()["codes_used"] > 8  # restarted codes now win data


def test_l2_normalized_codebook_stays_on_sphere():
    vq = VectorQuantizer(CodebookConfig(num_codes=8, dim=4, l2_normalize=True, beta=1.0)).train()
    vq(torch.randn(64, 4) * 3)
    assert torch.allclose(vq.embedding.norm(dim=-1), torch.ones(8), atol=1e-5)


def test_cosine_ramp_endpoints():
    assert cosine_ramp(0, 1.0, 1 / 16, 100) == 1.0
    assert cosine_ramp(100, 1.0, 1 / 16, 100) == 1 / 16
    assert cosine_ramp(50, 0.0, 6.6, 100) == pytest.approx(3.3)


def test_dvae_shapes_and_gradients():
    torch.manual_seed(0)
    model = DiscreteVAE(TINY_DVAE)
    x = torch.rand(2, 3, 32, 32) * 0.8 + 0.1  # DALL-E mapped pixels
    out = model(x, step=10)
    assert out["recon"].shape == x.shape and out["ids"].shape == (2, 4, 4)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.tokenize(x).shape == (2, 4, 4)
    assert DALLE_MEAN == pytest.approx(-0.125) and DALLE_STD == pytest.approx(1.25)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_dvae_plain_reconstruction_losses(loss):
    cfg = DVAEConfig(**{**TINY_DVAE.__dict__, "recon_loss": loss})
    out = DiscreteVAE(cfg)(torch.rand(2, 3, 16, 16), step=0)
    assert out["recon"].shape == (2, 3, 16, 16) and math.isfinite(float(out["loss"].detach()))


def test_export_roundtrip_gives_same_ids_and_drops_decoder(tmp_path):
    torch.manual_seed(0)
    model = DiscreteVAE(TINY_DVAE).eval()
    meta = {"input_size": 32, "interpolation": "lanczos", "mean": [DALLE_MEAN] * 3, "std": [DALLE_STD] * 3}
    save_tokenizer_export(model, tmp_path / "export", meta)
    tok = load_tokenizer(tmp_path / "export")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(tok.tokenize(x), model.tokenize(x))
    assert tok.grid == (4, 4) and tok.vocab_size == 64 and tok.input_size == (32, 32)
    assert tok.interpolation == "lanczos" and tok.mean == (DALLE_MEAN,) * 3
    assert tok.model.decoder is None  # the decoder is not part of the export by default
    with pytest.raises(ValueError):
        tok.tokenize(torch.rand(1, 3, 16, 16))  # wrong input size is an error, not silent garbage


def test_export_with_decoder_on_request(tmp_path):
    model = DiscreteVAE(TINY_DVAE)
    meta = {"input_size": 32, "interpolation": "lanczos", "mean": [0.0] * 3, "std": [1.0] * 3}
    save_tokenizer_export(model, tmp_path / "e", meta, include_decoder=True)
    tok = load_tokenizer(tmp_path / "e")
    ids = tok.tokenize(torch.rand(1, 3, 32, 32))
    assert tok.model.decode_ids(ids).shape == (1, 3, 32, 32)


def test_export_meta_is_checked(tmp_path):
    with pytest.raises(ValueError, match="input_size"):
        save_tokenizer_export(DiscreteVAE(TINY_DVAE), tmp_path, {"mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


@pytest.mark.parametrize("kind", ["dvae", "peco", "vqkd"])
def test_random_export_for_pretrain_tests(tmp_path, kind):
    path = save_random_tokenizer_export(tmp_path / kind, kind=kind, input_size=32)
    tok = load_tokenizer(path)
    ids = tok.tokenize(torch.randn(2, 3, 32, 32))
    assert ids.shape == (2, *tok.grid) and ids.dtype == torch.long
    assert int(ids.max()) < tok.vocab_size
    rebuilt = build_tokenizer_model(kind, tok.info["arch"])
    assert rebuilt.kind == kind


def test_vqgan_downsamples_16x_and_trains_encoder_through_codes():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(vocab_size=32, embed_dim=8, channels=8, channel_mult=(1, 1, 2, 2, 2),
                              num_res_blocks=1)).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out["recon"].shape == x.shape and out["ids"].shape == (2, 4, 4)
    out["loss"].backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert model.quantizer.embedding.grad is None  # the codebook moves by EMA, not by the optimiser
    model.eval()
    assert torch.equal(model.tokenize(x), out["ids"])
    assert model.decode_ids(out["ids"]).shape == x.shape


def test_vqkd_regresses_teacher_tokens_with_cosine_loss():
    torch.manual_seed(0)
    cfg = VQKDConfig(image_size=32, patch_size=8, dim=32, depth=1, heads=2, decoder_depth=1, vocab_size=16,
                     code_dim=8, teacher_dim=24)
    assert cfg.codebook.l2_normalize and cfg.codebook.beta == 1.0 and cfg.codebook.num_codes == 16
    model = VQKD(cfg).train()
    x, target = torch.randn(2, 3, 32, 32), torch.randn(2, 16, 24)
    out = model(x, target)
    assert out["ids"].shape == (2, 4, 4)
    out["loss"].backward()
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert cosine_regression_loss(target, target) < 1e-6
    assert cosine_regression_loss(-target, target) == pytest.approx(2.0)


def test_teacher_tokens_are_resized_to_the_tokenizer_grid():
    tokens = torch.randn(2, 1 + 64, 5)  # CLS + 8x8 patches
    assert align_teacher_tokens(tokens, (4, 4)).shape == (2, 16, 5)
    assert torch.equal(align_teacher_tokens(tokens, (8, 8)), tokens[:, 1:])


def test_perceptual_loss_is_zero_on_identical_images_and_moves_only_the_reconstruction():
    from mimkit.teachers import CLIPTeacher, tiny_open_clip_cfg
    from mimkit.tokenizers.losses import PerceptualLoss

    torch.manual_seed(0)
    teacher = CLIPTeacher(model_cfg=tiny_open_clip_cfg())  # the tower's 32 px, its preprocess cfg's statistics
    loss = PerceptualLoss.from_teacher(teacher, [0, 1], [0.5] * 3, [0.5] * 3)
    x = torch.randn(2, 3, 64, 64)  # resized to the tower's 32 px inside
    assert float(loss(x, x)) < 1e-6
    recon = (x + 0.5 * torch.randn_like(x)).requires_grad_(True)
    value = loss(x, recon)
    value.backward()
    assert value > 0 and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.visual.parameters())  # frozen


def test_adversarial_terms_push_only_their_own_network():
    from mimkit.tokenizers.losses import PatchDiscriminator, generator_adversarial_loss, hinge_discriminator_loss

    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, n_layers=2)
    fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    generator_adversarial_loss(disc, fake).backward()
    assert fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())  # the generator term leaves D alone
    hinge_discriminator_loss(disc(torch.randn(2, 3, 32, 32)), disc(fake.detach())).backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_perceptual_loss_on_a_mimkit_vit():
    from functools import partial

    from mimkit.models.vit import ViTConfig, VisionTransformer
    from mimkit.teachers import vit_block_patch_tokens
    from mimkit.tokenizers.losses import PerceptualLoss

    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    loss = PerceptualLoss(vit, partial(vit_block_patch_tokens, vit, layers=[0, 1]), (32, 32), [0.5] * 3, [0.5] * 3,
                          [0.5] * 3, [0.5] * 3)
    x = torch.randn(2, 3, 32, 32)
    assert float(loss(x, x)) < 1e-6 and float(loss(x, x.flip(-1))) > 0
