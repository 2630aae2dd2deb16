"""Hydra configs of fastdistill, installed with the package (``pkg://fastdistill.configs``)."""
