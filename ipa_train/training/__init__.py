"""Training: datasets of captioned images and the training loop with its checkpoints."""
