"""The reference recipe's training settings (ML-20m on one GPU): ncf.py's defaults, which the
other tools take from here. No torch here: prepare.py prints a training command from them."""

DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 2 ** 20
DEFAULT_NEGATIVE_SAMPLES = 4
DEFAULT_LEARNING_RATE = 0.0045
DEFAULT_BETAS = (0.25, 0.5)
DEFAULT_EPS = 1e-8
