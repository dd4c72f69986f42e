"""Which files of a pipeline directory are shipped to other nodes (pure: no Ray, no model)."""
from pathlib import Path

from workers.weights import choose_files, pipeline_files


def test_the_files_a_load_reads_are_chosen():
    names = ["model_index.json", "scheduler/scheduler_config.json",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
             "text_encoder_2/model.fp16.safetensors", "text_encoder_2/pytorch_model.fp16.bin",
             "tokenizer/vocab.json", "unet/model.onnx", "vae_decoder/model.onnx", ".gitattributes", ".cache/x.lock"]
    assert choose_files(names) == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/model.fp16.safetensors",
        "tokenizer/vocab.json"])


def test_pipeline_files_lists_sizes_under_the_directory(tmp_path: Path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / ".complete").write_text("d")
    assert pipeline_files(tmp_path) == [("model_index.json", 2), ("unet/diffusion_pytorch_model.safetensors", 10)]
