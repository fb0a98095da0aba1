"""The launch side: plan the processes (processes), start them (the torchrun agent, engines, Ray), reach the main
node (network), describe them for Kubernetes. Imports no torch at import time: `distrnn train` plans and starts
workers without it (tests/unit/test_code_shape.py)."""
