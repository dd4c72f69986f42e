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
    assert VAE["block_out_channels"] == (128, 256, 512, 512) and ARCH_MODELS == ("sdxl-arch", "sd15-arch")


def test_arch_models_are_named_in_help():
    from search.cli.run_commands import MODEL_HELP

    assert "sdxl-arch" in MODEL_HELP and "sd15-arch" in MODEL_HELP
