"""Data shipped with Encapure: texts for int8 calibration, read as package resources rather than imported."""
