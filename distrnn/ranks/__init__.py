"""The rank logic under the worker, the run folder, the data and evaluation: the Accelerator and its collectives
(agreement, sums, heartbeats), devices and precision, stop requests."""
