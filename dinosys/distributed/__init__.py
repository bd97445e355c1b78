"""Distributed training: launcher detection (env), FSDP2 wrapping (fsdp), checkpoints."""
