"""Training: the trainer, generation, token accounting, fault handling and the model card."""
