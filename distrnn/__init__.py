"""distrnn: train the stacked-RNN MNIST classifier on a CPU, one GPU, DDP or SLURM."""

__version__ = "0.1.0"
