"""Fault injection for the tests (DISTRNN_FAULTS): kept in one clearly named place, off unless the variable is set."""
