"""The shipped Accelerate launch configs, installed as distrnn.launch."""
