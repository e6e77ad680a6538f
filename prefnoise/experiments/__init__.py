"""The paper's experiments, rebuilt only from prefnoise's own library functions."""
