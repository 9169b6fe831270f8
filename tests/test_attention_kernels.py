"""`mimkit.models.sdpa`: the attention-kernel probe names torch's own choice for every SDPA call."""

import torch

from mimkit.models.vit import VisionTransformer, ViTConfig


def test_attention_kernels_reports_torchs_choice_for_each_call():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mimkit.models.sdpa import AttentionKernels

    torch.manual_seed(0)
    beit = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                                       pos_embed="none", rel_pos="shared", qkv_bias="qv"))
    x = torch.randn(2, 3, 32, 32)
    with AttentionKernels() as unrestricted:
        expected = beit.forward_features(x)
    assert sum(unrestricted.calls.values()) == 3  # one call per block
    with sdpa_kernel([SDPBackend.MATH]), AttentionKernels() as math_only:
        got = beit.forward_features(x)
    assert math_only.summary() == "MATH x3"  # the probe follows what torch dispatches
    torch.testing.assert_close(got, expected)  # and the calls ran unchanged
    with torch.no_grad(), AttentionKernels() as frozen:  # a frozen network's bias needs no gradient
        beit.forward_features(x)
    assert frozen.calls["MATH"] == 0, frozen.summary()  # a bias without grad runs fused on this CPU too
