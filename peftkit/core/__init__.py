"""Core: method specs and the one registry (`methods.METHODS`; the base class in `spec`, the LoRA
family, DoRA, PiSSA's init and LoRA+'s ratio in `lora_specs`, any Hugging Face PEFT method in
`peft_method`), the architecture defaults as data
(`architectures`: where LoRA and adapters go on BERT, GPT-2, Llama, T5, ViT, ...), which layer
kinds each method wraps (`kinds`), finding target layers by name (`targets`), and surgery on a
model (`surgery`: apply, report, merge, unmerge, unload; heads and tied weights).

May import: layers.
"""
