"""Ray workers and what they load.

The Core AI extra (issue 36) installs torchao, which diffusers and torch then import on every
pipeline load; its CUDA kernels cannot load on a CPU build and it registers enums torch calls
deprecated. Those are warnings about a library this project never uses for loading models, printed
on every command: they are silenced here, before any of those libraries is imported.
"""
import logging as _logging

for _name in ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
