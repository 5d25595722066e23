"""raysft: SFT records in, packed Megatron .bin/.idx datasets out, on Ray."""

__version__ = "0.1.0"
