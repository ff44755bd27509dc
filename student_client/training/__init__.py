"""Training a student: distillation losses, student models, the training loop, MNIST data and the
quickstart demo."""
