"""Files: peftkit's adapter files (adapter_file.py: safetensors + JSON, checked before anything
changes, never unpickled; safe_io.py the atomic writes and bounded, checksummed reads beneath
them; fingerprint.py what identifies the base an adapter belongs to) and Hugging Face PEFT's
LoRA format, both ways (peft_format.py).

May import: core, layers, storage (atomic folders, checksums).
"""
