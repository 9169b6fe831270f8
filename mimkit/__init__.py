"""mimkit: distributed masked image modeling, from visual tokenizers to fine-tuning."""
__version__ = "0.1.0"
