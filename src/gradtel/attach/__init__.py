"""How gradtel runs without a collect() in the loop: optimizer and AMP hooks, gradient clipping, and the DDP/FSDP hooks that count each rank's own gradients (the framework callbacks are in gradtel.integrations)."""

__all__: list[str] = []
