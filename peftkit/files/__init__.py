"""Files: peftkit's adapter files (safetensors + JSON, checked before anything changes, never
unpickled) and Hugging Face PEFT's LoRA format, both ways.

May import: core, layers, storage (atomic folders, checksums).
"""
