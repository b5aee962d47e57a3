"""Base architectures and how to tell them apart from tensor shapes alone.

The UNet's cross-attention context width decides: 768 = sd1, 1024 = sd2, 2048 = sdxl. Text-encoder
widths: 768 (CLIP ViT-L, sd1 and sdxl's first), 1024 (OpenCLIP ViT-H, sd2), 1280 (OpenCLIP ViT-bigG,
sdxl's second). The embedded tiny bases have widths of their own so they are never mistaken for a
real architecture.
"""
from __future__ import annotations

CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 64: "tiny-sd1", 96: "tiny-sdxl"}
TEXT_WIDTH = {768: "sd1", 1024: "sd2", 64: "tiny-sd1", 32: "tiny-sdxl"}  # the (first) text encoder's hidden size
TEXT2_WIDTH = {1280: "sdxl", 64: "tiny-sdxl"}  # the second text encoder of sdxl-shaped models
# kohya / modelspec metadata values
METADATA_ARCH = (
    ("ss_base_model_version", "sdxl", "sdxl"),
    ("ss_base_model_version", "sd_v2", "sd2"),
    ("ss_base_model_version", "sd_2", "sd2"),
    ("ss_base_model_version", "sd_v1", "sd1"),
    ("ss_base_model_version", "sd_1", "sd1"),
    ("modelspec.architecture", "stable-diffusion-xl", "sdxl"),
    ("modelspec.architecture", "stable-diffusion-v2", "sd2"),
    ("modelspec.architecture", "stable-diffusion-v1", "sd1"),
)
ARCHS = ("sd1", "sd2", "sdxl")


def arch_from_context_width(width: int | None) -> str:
    return CONTEXT_WIDTH.get(int(width), "unknown") if width else "unknown"


def arch_from_metadata(metadata: dict[str, str]) -> str:
    for key, needle, arch in METADATA_ARCH:
        if needle in metadata.get(key, "").lower():
            return arch
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    return "unknown"
