"""Measuring mmhat backbones: FLOPs (:mod:`.flops`), speed and memory (:mod:`.benchmark`),
and which SDPA kernel each attention call can take (:mod:`.sdpa`). The command lines in
``tools/`` are thin wrappers around these."""
