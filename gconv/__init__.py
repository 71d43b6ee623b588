"""gconv: grouped and shuffled grouped convolutions in JAX/Flax."""
from gconv.ops import channel_shuffle, channel_unshuffle, grouped_conv, grouped_conv_reference

__version__ = "0.1.0"
__all__ = ["grouped_conv", "grouped_conv_reference", "channel_shuffle", "channel_unshuffle"]
