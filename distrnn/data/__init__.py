"""MNIST: the files (mnist) and the sharded loaders."""
