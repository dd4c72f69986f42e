"""The full-architecture built-ins, checked on the meta device only (building sdxl-arch writes
~5 GB: never part of the test suite)."""
from workers.arch_models import ARCH_MODELS, VAE, meta_unet, unet_config
from workers.models import candidate_layers


def test_sdxl_arch_is_the_sdxl_unet():
    unet = meta_unet("sdxl-arch")
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    cands = candidate_layers(unet, 100_000)
    assert len(cands) == 792 and max(c.numel for c in cands) == 1280 * 2560 * 9
    assert unet_config("sdxl-arch")["transformer_layers_per_block"] == (1, 2, 10)


def test_sd15_arch_is_the_sd15_unet():
    unet = meta_unet("sd15-arch")
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert unet.config.cross_attention_dim == 768 and len(unet.down_blocks) == 4
    assert VAE["block_out_channels"] == (128, 256, 512, 512) and ARCH_MODELS == ("sdxl-arch", "sd15-arch", "sd35m-arch")


def test_arch_models_are_named_in_help():
    from search.cli.run_commands import MODEL_HELP

    assert "sdxl-arch" in MODEL_HELP and "sd15-arch" in MODEL_HELP and "sd35m-arch" in MODEL_HELP


def test_sd35m_arch_is_the_real_sd35_medium_transformer():
    """sd35m-arch's transformer, counted on the meta device, against a hand count of the published
    SD3.5-medium config: 24 joint blocks of width 1536, dual attention in blocks 0-12, the last
    block context-pre-only. Per block: attention q/k/v/out + added q/k/v/out (8), ff and
    ff_context (2 + 2), the two AdaLN linears (2) = 14, plus attn2's q/k/v/out (4) in the 13 dual
    blocks; the last: 4 + 3 (no added out) + ff (2) + 2 AdaLN = 11; outside the blocks:
    context_embedder, the 4 time/text embedding linears, norm_out's linear (pos_embed's conv and
    proj_out have 98,304 elements: not above 1e5)."""
    from workers.denoiser import candidate_layers
    from workers.real_configs import analysis_size

    hand = 13 * (14 + 4) + 10 * 14 + 11 + 1 + 4 + 1
    transformer = meta_unet("sd35m-arch")
    ours = candidate_layers(transformer, 100_000)
    assert len(ours) == hand == 391
    real = analysis_size("sd3.5-medium")
    assert real["candidates"] == len(ours) and real["params"] == sum(p.numel() for p in transformer.parameters())
    assert real["params"] == 2_243_171_520 and real["pipeline_runs"] == 10 * 391
    assert "sd35m-arch" in ARCH_MODELS


def test_real_denoisers_match_their_published_sizes():
    """Parameters of the real denoisers (meta device, published configs) against the sizes their
    model cards publish: SD3.5-large 8.1 B, Flux.1 12 B, PixArt-Σ 0.6 B (within rounding)."""
    from workers.real_configs import analysis_size

    published = {"sd3.5-large": 8.1e9, "flux-schnell": 12e9, "pixart-sigma": 0.6e9}
    for name, size in published.items():
        params = analysis_size(name)["params"]
        assert abs(params - size) / size < 0.03, (name, params)
    refiner = analysis_size("sdxl-refiner-1.0")
    assert refiner["candidates"] > 500 and refiner["steps_per_run"] == 1