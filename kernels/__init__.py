"""Triton kernels of fastdistill (installed as ``fastdistill.kernels``).

Each kernel ``<name>`` lives in ``kernels/<name>.py`` beside its PyTorch reference in
``fastdistill/losses/<name>.py``; the public function of the kernel module has the reference's
name and signature plus ``backend: auto|triton|torch`` (auto = Triton on CUDA, the reference elsewhere).
"""
