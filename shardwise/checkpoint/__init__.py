"""Checkpoints: Hugging Face safetensors and GGUF files, read per rank (only the rank's slice)."""
