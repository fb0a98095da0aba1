"""The run folder: its names (folder), its hold, integrity records, checkpoints, the resume layout (elastic),
model files."""
