"""The run folder: its names (folder), its hold, integrity records, checkpoints, the resume layout (layout),
model files."""
