"""LoRA adapters: loading PEFT folders, device slots, and the batched LoRA matmuls."""
