"""Every Resources component except the denoiser, one function each (what a bundle calls).

Each converts ONE component and frees what it built before returning (Apple's users run out of
memory converting SDXL's components together); the torch pipeline is never changed, so a caller
short of memory drops each torch component after converting it. The work lives in
``text_encoders`` (TextEncoder, TextEncoder2), ``vae`` (VAEDecoder, VAEEncoder) and ``tokenizer``
(vocab.json, merges.txt); ``packaging`` is their shared convert / palettize / save step.
"""
from workers.coreml.bundle.packaging import Converted
from workers.coreml.bundle.text_encoders import convert_text_encoder
from workers.coreml.bundle.tokenizer import TokenizerFiles, write_tokenizer
from workers.coreml.bundle.vae import convert_vae_decoder, convert_vae_encoder, swift_can_encode, vae_precision

__all__ = ["Converted", "TokenizerFiles", "convert_text_encoder", "convert_vae_decoder", "convert_vae_encoder",
           "swift_can_encode", "vae_precision", "write_tokenizer"]
