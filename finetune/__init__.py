"""Fine-tuning with accelerate: `accelerate launch finetune --config ...`."""
