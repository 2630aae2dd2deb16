"""Compile every Triton kernel of fastdistill ahead of time for sm_80 and sm_90, on CPU, and check its resources.

No GPU is needed. The project's own launch paths run on uninitialised CPU tensors of the published sizes: the
public functions with ``backend="triton"`` and their autograd backward (``grad_cosine_loss``, ``linear_head_grad``,
``linear_head_grad_sums``, ``grad_cosine_feature_grad``; ``bn_stats_loss``, ``arc_update``; ``attention_kl``), so
their dispatchers, autograd Functions and launchers (``grad_cosine_fwd``/``_bwd``, ``bn_stats_fwd``/``_bwd``,
``attention_kl_fwd``/``_bwd``, ...) choose tiles, warps and dtypes as on a GPU, while every
``kernel[grid](*args, **kwargs)`` is intercepted. Triton's own binder turns each launch into what a CUDA launch
would compile (pointer dtypes, ``i32``/``i64`` ints specialised on ``== 1`` and divisibility by 16, pointer
alignment, constexprs, ``num_warps``); each distinct configuration is compiled with ``triton.compile`` for a
``GPUTarget`` (ptxas ships with the triton wheel) and checked:

    compile error                      any
    shared memory per block            > the target's opt-in maximum (sm_90 232448 B, sm_80 166912 B)
    register spills (ptxas -v)         > SPILL_BYTES_MAX spill-store or spill-load bytes per thread

Registers and spills come from ptxas' own report of the compile (``TRITON_DUMP_PTXAS_LOG``), shared memory
from Triton's metadata. Results are cached in ``${TMPDIR:-/tmp}/fastdistill-aot`` by a hash of the kernel
source, the configuration, the target and the triton version, so a re-run compiles only what changed.

Sizes (the methods' published settings; a size reaches the compile only through constexprs, dtypes and the
int specialisation, so most of them share configurations):

    grad_cosine   N 512 x C 10/100/1000 x D 384/768/1536, two backbones (the second one's cosine coefficients
                  are a view 12 bytes in, so it compiles the unaligned variant that 2-4 backbones launch);
                  fp32 head weights as in recipes/lgm.py
    bn_stats      the BatchNorm2d inputs of timm resnet18 at batch 100 and 224/64/32 px, NCHW and
                  channels_last; ARC on the (100, 3, px, px) images
    attention_kl  B 32 x H 12 x L 197/577/1025, head dims 64/128/256 (teacher = student)

each in float32, float16 and bfloat16; float32 under torch's default matmul precision ("highest") and, with
``--fp32-precisions highest high``, also with TF32 allowed. A size a launch path refuses (a head dim over the
kernel's cap, which ``auto`` sends to torch) is listed as not compiled. bn_stats sizes its grid by the SM count,
so the launch paths see a device model per target (A100 for sm_80, H100/H200 for sm_90). Needs a Linux triton
with its nvidia backend; not under TRITON_INTERPRET=1, which replaces every @triton.jit function.

    python benchmarks/kernels_aot.py                              # everything: table + results/kernels_aot.json
    python benchmarks/kernels_aot.py --families attention_kl --targets sm_90 --jobs 2
    python benchmarks/kernels_aot.py --sizes ci --out /tmp/aot.json   # the subset tests/kernels compiles

Every published size: 364 configurations, 240 s of CPU time with an empty cache (5 min on 2 cores that another
job shared, about 2.5 min on 2 idle ones), 15 s cached. Exit status 1 when a configuration fails a check or a
kernel is launched by no workload (listed after the table).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

# run as a script, sys.path holds benchmarks/ but not the repository root that `benchmarks._harness` needs
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import RESULTS_DIR, git_sha, print_table  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target and the device a launch on it is modelled on (the SM count sets some grids)."""

    name: str
    capability: int
    shared_limit: int  # bytes of shared memory per block, opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    device: str
    sms: int


TARGETS = {
    "sm_80": Target("sm_80", 80, 166912, "NVIDIA A100-SXM4-80GB", 108),
    "sm_90": Target("sm_90", 90, 232448, "NVIDIA H100 80GB HBM3", 132),
}

# Local memory a thread may spill, in bytes (ptxas' "spill stores" and "spill loads" per thread). 256 B is 64
# registers' worth, a quarter of the 255 a thread can hold: a few values parked across the inner loop, which L1
# serves. Past that the spill traffic of each loop step rivals the tile loads: the fp32 "ieee" tl.dot path spilled
# 4-28 KiB per thread in grad_cosine's adjoint/backward and attention_kl's dq/dk, and ran 5-30x slower than eager
# on an H200.
SPILL_BYTES_MAX = 256

FAMILIES = ("grad_cosine", "bn_stats", "attention_kl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUT_PATH = RESULTS_DIR / "kernels_aot.json"
# bump when the cached record changes shape
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Workload:
    """One published size of one kernel family: ``launch()`` runs the family's launch paths on CPU tensors."""

    family: str
    dtype: str
    size: str
    launch: Callable[[], None]
    fp32_precision: str = "highest"  # torch.get_float32_matmul_precision() during the launch


# --------------------------------------------------------------------------------------------------------------
# Published sizes -> workloads (the public launch paths of kernels/*.py with backend="triton", and their backward)
# --------------------------------------------------------------------------------------------------------------

GRAD_COSINE_N = 512
GRAD_COSINE_CLASSES = (10, 100, 1000)
GRAD_COSINE_DIMS = (384, 768, 1536)
BN_STATS_ARCH = "resnet18"
BN_STATS_BATCH = 100
BN_STATS_RESOLUTIONS = (224, 64, 32)
BN_STATS_LAYOUTS = ("nchw", "channels_last")
ATTENTION_KL_BATCH, ATTENTION_KL_HEADS = 32, 12
ATTENTION_KL_TOKENS = (197, 577, 1025)
ATTENTION_KL_HEAD_DIMS = (64, 128, 256)


def grad_cosine_workloads(classes=GRAD_COSINE_CLASSES, dims=GRAD_COSINE_DIMS, dtypes=tuple(DTYPES),
                          fp32_precisions=("highest",), n=GRAD_COSINE_N) -> list[Workload]:
    """The loss of two backbones with its backward, the real side, and the two-pass step's per-view parts."""
    from fastdistill.kernels import grad_cosine as kernel

    def launch(c, d, dtype):
        feats = [torch.empty(n, d, dtype=dtype, requires_grad=True) for _ in range(2)]
        labels = torch.zeros(n, dtype=torch.long)
        # the heads are fp32 whatever the feature dtype (recipes/lgm.py draws them with torch.randn)
        weights = [torch.empty(c, d) for _ in feats]
        biases = [torch.empty(c) for _ in feats]
        real = [(torch.empty(c, d), torch.empty(c)) for _ in feats]
        kernel.grad_cosine_loss(feats, labels, weights, biases, real, backend="triton").backward()
        f = feats[0].detach()
        kernel.linear_head_grad(f, labels, weights[0], biases[0], backend="triton")
        kernel.linear_head_grad_sums(f, labels, weights[0], biases[0], backend="triton")
        kernel.grad_cosine_feature_grad(f, labels, weights[0], biases[0], real[0], n, backend="triton")

    out = []
    for name in dtypes:
        # torch's matmul precision only changes the float32 kernels (tl.dot's input_precision)
        for precision in fp32_precisions if name == "float32" else ("highest",):
            for c in classes:
                for d in dims:
                    out.append(Workload("grad_cosine", name, f"N={n} C={c} D={d} M=2",
                                        lambda c=c, d=d, dt=DTYPES[name]: launch(c, d, dt), precision))
    return out


def bn_stats_workloads(resolutions=BN_STATS_RESOLUTIONS, layouts=BN_STATS_LAYOUTS, dtypes=tuple(DTYPES),
                       fp32_precisions=("highest",), batch=BN_STATS_BATCH, arch=BN_STATS_ARCH) -> list[Workload]:
    """The BN-statistics loss and its backward on every BN input of ``arch``; ARC on the images themselves
    (no tl.dot: ``fp32_precisions`` changes nothing here)."""
    from benchmarks.bench_bn_stats import bn_layer_inputs
    from fastdistill.kernels import bn_stats as kernel

    def launch(shapes, image, layout, dtype):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for shape in shapes:
            # torch.empty only reserves address space: 100 x 64 x 112 x 112 fp32 is never touched
            x = torch.empty(shape, dtype=dtype, memory_format=fmt, requires_grad=True)
            c = shape[1]
            kernel.bn_stats_loss(x, torch.empty(c), torch.empty(c), backend="triton").backward()
        x = torch.empty(image, dtype=dtype, memory_format=fmt)
        lo, hi = torch.empty(image[1]), torch.empty(image[1])
        kernel.arc_update(x, torch.empty_like(x), 0.5, lo, hi, out=x, backend="triton")

    out = []
    for res in resolutions:
        shapes = sorted({(batch, *shape[1:]) for shape, _ in bn_layer_inputs(arch, res)})
        image = (batch, 3, res, res)
        for layout in layouts:
            for name in dtypes:
                out.append(Workload("bn_stats", name, f"{arch} N={batch} {res}px {layout}",
                                    lambda s=shapes, i=image, lay=layout, dt=DTYPES[name]: launch(s, i, lay, dt)))
    return out


def attention_kl_workloads(tokens=ATTENTION_KL_TOKENS, head_dims=ATTENTION_KL_HEAD_DIMS, dtypes=tuple(DTYPES),
                           fp32_precisions=("highest",), batch=ATTENTION_KL_BATCH,
                           heads=ATTENTION_KL_HEADS) -> list[Workload]:
    """The loss and its backward (dQ and dK kernels), teacher and student heads of one dim."""
    from fastdistill.kernels import attention_kl as kernel

    def launch(n, d, dtype):
        q_t, k_t = (torch.empty(batch, heads, n, d, dtype=dtype) for _ in range(2))
        q_s, k_s = (torch.empty(batch, heads, n, d, dtype=dtype, requires_grad=True) for _ in range(2))
        kernel.attention_kl(q_t, k_t, q_s, k_s, backend="triton").backward()

    out = []
    for name in dtypes:
        # torch's matmul precision only changes the float32 kernels (tl.dot's input_precision)
        for precision in fp32_precisions if name == "float32" else ("highest",):
            for d in head_dims:
                for n in tokens:
                    out.append(Workload("attention_kl", name, f"B={batch} H={heads} L={n} D={d}",
                                        lambda n=n, d=d, dt=DTYPES[name]: launch(n, d, dt), precision))
    return out


WORKLOADS = {"grad_cosine": grad_cosine_workloads, "bn_stats": bn_stats_workloads,
             "attention_kl": attention_kl_workloads}

# The subset tests/kernels/test_aot_compile.py compiles: every kernel, float32 and bfloat16 (float16 got the shared
# memory and spills of bfloat16 and registers within 15 in the full run). grad_cosine at C 1000 only, its largest
# tiles (64-wide dot tiles, 1024-class softmax rows; D changes only the int specialisation); every BN input (each
# resolution adds tile shapes, and they compile in a fraction of a second); attention_kl at one L (L changes only
# the int specialisation), every head dim (256 checks the dispatcher's cap: a refused size is listed, not compiled).
CI_SIZES = {
    "grad_cosine": {"classes": (1000,), "dims": (384,), "dtypes": ("float32", "bfloat16")},
    "bn_stats": {"dtypes": ("float32", "bfloat16")},
    "attention_kl": {"tokens": (197,), "dtypes": ("float32", "bfloat16")},
}


def workloads(families=FAMILIES, sizes: str = "published", fp32_precisions=("highest",)) -> list[Workload]:
    """The workloads of ``families`` at the published sizes, or at the test's subset (``sizes="ci"``)."""
    if sizes not in ("published", "ci"):
        raise ValueError(f"unknown sizes {sizes!r}; expected published or ci")
    return [w for family in families
            for w in WORKLOADS[family](**(CI_SIZES[family] if sizes == "ci" else {}),
                                       fp32_precisions=fp32_precisions)]


# --------------------------------------------------------------------------------------------------------------
# Intercepting launches
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    """One distinct compilation: a kernel specialised for one launch, on one target."""

    key: str
    kernel: str
    module: str
    target: Target
    jit: object  # triton.runtime.jit.JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object  # the backend's parsed options (CUDAOptions)

    def constants(self) -> dict:
        """Constexpr parameters (and ints Triton specialised to constants) by name, JSON-friendly."""
        names = [p.name for p in self.jit.params]
        out = {}
        for path, value in self.constexprs.items():
            name = names[path[0]] + "".join(f"[{i}]" for i in path[1:])
            out[name] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
        return out

    def signature_str(self) -> str:
        """Triton's view of the runtime arguments: ``*fp32:16`` is a pointer aligned to 16 bytes, ``i32:16`` an int
        divisible by 16 (constexprs and ints specialised to 1 are left out)."""
        parts = []
        for i, (name, ty) in enumerate(self.signature.items()):
            if ty == "constexpr":
                continue
            divisible = any(a and a[0] == "tt.divisibility" for a in self.attrs.get((i,)) or [])
            parts.append(f"{name}: {ty}{':16' if divisible else ''}")
        return ", ".join(parts)


@dataclasses.dataclass
class Launch:
    workload: Workload
    config_key: str


def _gpu_target(target: Target):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", target.capability, 32)


class _Binder:
    """Triton's argument binder for one kernel and target: the same specialisation as ``JITFunction.run``."""

    def __init__(self, jit, target: Target):
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.jit = jit
        self.target = target
        self.backend = make_backend(_gpu_target(target))
        self.bind = create_function_from_signature(jit.signature, jit.params, self.backend)

    def config(self, args, kwargs) -> Config:
        import triton
        from triton import knobs

        # as JITFunction.run, which adds these two before binding
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", self.jit.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound, specialization, options = self.bind(*args, **kwargs)
        options, signature, constexprs, attrs = self.jit._pack_args(self.backend, kwargs, bound, specialization,
                                                                     options)
        fn = self.jit.fn
        material = json.dumps({
            "format": _CACHE_FORMAT, "triton": triton.__version__, "ptxas": knobs.nvidia.ptxas.version,
            "source": self.jit.cache_key,
            "kernel": f"{fn.__module__}.{fn.__qualname__}", "target": self.target.name,
            "signature": signature, "constexprs": {str(k): repr(v) for k, v in constexprs.items()},
            "attrs": {str(k): v for k, v in attrs.items()},
            "options": {k: repr(v) for k, v in sorted(options.__dict__.items())},
        }, sort_keys=True, default=repr)
        key = hashlib.sha256(material.encode()).hexdigest()[:24]
        return Config(key, fn.__name__, fn.__module__, self.target, self.jit, signature, constexprs, attrs, options)


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        # InterpretedFunction (TRITON_INTERPRET=1) cannot be compiled: triton.language's own @jit helpers (tl.cdiv,
        # the combine functions of tl.sum) are interpreted too; Autotuner/Heuristics need their configs listed here
        raise TypeError(f"kernels_aot: cannot compile {kernel!r}: expected a @triton.jit JITFunction; run without "
                        f"TRITON_INTERPRET=1 and list the configurations of autotuned kernels")
    return kernel


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def _launch_as_on(target: Target, fp32_precision: str, on_launch: Callable) -> Iterator[None]:
    """Make the launchers behave as on a ``target`` GPU and hand every ``kernel[grid](...)`` to ``on_launch``.

    - ``kernel[grid](*args, **kwargs)`` records instead of launching (KernelInterface.__getitem__, the base of
      JITFunction);
    - Triton counts as available, so the public per-view functions take their Triton path with backend="triton";
    - the SM count comes from the target's device model (bn_stats sizes its grid with it).
    """
    from triton.runtime.jit import KernelInterface

    from fastdistill.kernels import _utils, bn_stats

    def getitem(kernel, grid):
        return lambda *args, **kwargs: on_launch(kernel, args, kwargs)

    props = SimpleNamespace(name=target.device, multi_processor_count=target.sms, major=target.capability // 10,
                            minor=target.capability % 10, shared_memory_per_block_optin=target.shared_limit)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(fp32_precision)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(KernelInterface, "__getitem__", getitem))
            stack.enter_context(_patched(_utils, "triton_available", lambda: True))
            stack.enter_context(_patched(torch.cuda, "get_device_properties", lambda device=None: props))
            if hasattr(bn_stats, "_target_programs"):
                # the launcher asks a CUDA device for its SM count; the tensors here are on the CPU
                original = bn_stats._target_programs
                stack.enter_context(_patched(bn_stats, "_target_programs",
                                             lambda device: original(torch.device("cuda"))))
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


_REFUSED = "use backend='torch' or 'auto'"


@dataclasses.dataclass
class Capture:
    configs: dict  # key -> Config
    launches: list  # Launch
    unsupported: list  # {"family", "dtype", "size", "target", "reason"}: sizes the launchers refuse


def capture(workloads: Iterable[Workload], targets: Iterable[Target]) -> Capture:
    """Run every workload once per target and collect the distinct configurations its launches compile."""
    out = Capture({}, [], [])
    binders: dict = {}
    for target in targets:
        for w in workloads:
            def on_launch(kernel, args, kwargs, w=w, target=target):
                jit = _jit_function(kernel)
                binder = binders.get((id(jit), target.name))
                if binder is None:
                    binder = binders[(id(jit), target.name)] = _Binder(jit, target)
                cfg = binder.config(args, kwargs)
                out.configs.setdefault(cfg.key, cfg)
                out.launches.append(Launch(w, cfg.key))

            with _launch_as_on(target, w.fp32_precision, on_launch):
                try:
                    w.launch()
                except ValueError as e:
                    # inputs a kernel cannot take (a head dim over its cap) raise under backend="triton" with this
                    # advice (kernels/_utils.py: dispatch), and go to the torch path under "auto"; anything else
                    # is a bug of the workload or the launch path
                    if _REFUSED not in str(e):
                        raise
                    out.unsupported.append({"family": w.family, "dtype": w.dtype, "size": w.size,
                                            "target": target.name, "reason": str(e)})
    return out


# --------------------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "fastdistill-aot"


def toolchain_missing() -> str | None:
    """Why nothing can be compiled here (no triton, no nvidia backend, no ptxas), or None."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        return f"triton's nvidia backend does not import ({e}); install the Linux triton wheel"
    try:
        knobs.nvidia.ptxas.path
    except RuntimeError as e:
        return f"ptxas not found ({e}); the triton wheel ships it in triton/backends/nvidia/bin"
    return None


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes per thread from ``ptxas -v`` (largest over the functions)."""
    props = [tuple(map(int, m)) for m in _PTXAS_PROPS.findall(log)]
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    if not props or not regs:
        raise RuntimeError(f"no resource usage in the ptxas log:\n{log}")
    return {"registers": max(regs), "stack_frame": max(p[0] for p in props),
            "spill_stores": max(p[1] for p in props), "spill_loads": max(p[2] for p in props)}


def _ptxas_verbose(ptx: str, arch: str) -> str:
    """ptxas -v on ``ptx`` with Triton's flags: the fallback where Triton did not print its own ptxas log."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
               "-o", str(src.with_suffix(".o"))]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


def compile_config(cfg: Config, cache: Path | None) -> dict:
    """Compile ``cfg``: registers, spills, shared memory (stored in ``cache``), or the compile error (not stored)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    start = time.perf_counter()
    log = io.StringIO()
    try:
        with tempfile.TemporaryDirectory() as triton_cache, knobs.nvidia.scope(), knobs.compilation.scope(), \
                knobs.cache.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # printed to stdout, captured: registers and spills of this compile
            knobs.compilation.always_compile = True
            knobs.cache.dir = triton_cache  # Triton's own cache stays out of the home directory
            compiled = triton.compile(ASTSource(cfg.jit, cfg.signature, cfg.constexprs, cfg.attrs),
                                      target=_gpu_target(cfg.target), options=cfg.options.__dict__)
        try:
            usage = parse_ptxas(log.getvalue())
        except RuntimeError:
            usage = parse_ptxas(_ptxas_verbose(compiled.asm["ptx"], _sm_arch(cfg.target)))
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain is the finding
        return {"error": f"{type(e).__name__}: {str(e).strip()[:2000]}", "cached": False}
    meta = compiled.metadata
    record = {
        **usage,
        "shared": int(meta.shared),
        "global_scratch": int(getattr(meta, "global_scratch_size", 0) or 0),
        "num_warps": int(meta.num_warps),
        "num_stages": int(meta.num_stages),
        "compile_s": round(time.perf_counter() - start, 2),
    }
    if cache is not None:
        path = cache / f"{cfg.key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    return {**record, "cached": False}


def _sm_arch(target: Target) -> str:
    # Triton compiles sm_90 as sm_90a (wgmma, TMA)
    return f"sm_{target.capability}{'a' if target.capability >= 90 else ''}"


_POOL_WORK: tuple = ({}, None)


def _compile_forked(key: str) -> dict:
    configs, cache = _POOL_WORK
    return compile_config(configs[key], cache)


def compile_all(configs: dict, cache: Path | None, jobs: int = 1,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """key -> compile record for every configuration, cached ones first, the rest in ``jobs`` forked processes
    (the compile holds the GIL, and each process captures its own ptxas log on its stdout)."""
    global _POOL_WORK
    results = {}
    todo = []
    for key, cfg in configs.items():
        path = cache / f"{key}.json" if cache is not None else None
        if path is not None and path.exists():
            results[key] = {**json.loads(path.read_text()), "cached": True}
        else:
            todo.append(key)
    done = len(results)
    if progress:
        progress(done, len(configs))
    if jobs > 1 and len(todo) > 1 and "fork" in multiprocessing.get_all_start_methods():
        _POOL_WORK = (configs, cache)
        try:
            with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("fork")) as pool:
                for key, record in zip(todo, pool.map(_compile_forked, todo)):
                    results[key] = record
                    done += 1
                    if progress:
                        progress(done, len(configs))
        finally:
            _POOL_WORK = ({}, None)
    else:
        for key in todo:
            results[key] = compile_config(configs[key], cache)
            done += 1
            if progress:
                progress(done, len(configs))
    return results


# --------------------------------------------------------------------------------------------------------------
# Checks and report
# --------------------------------------------------------------------------------------------------------------

def violations(record: dict, target: Target) -> list[str]:
    """What a compile record breaks: a compile error, shared memory over the target's limit, spills."""
    if "error" in record:
        return [f"compile error: {record['error'].splitlines()[0] if record['error'] else '?'}"]
    out = []
    if record["shared"] > target.shared_limit:
        out.append(f"shared memory {record['shared']} B > {target.shared_limit} B per block on {target.name}")
    spill = max(record["spill_stores"], record["spill_loads"])
    if spill > SPILL_BYTES_MAX:
        out.append(f"spills {record['spill_stores']} B stores / {record['spill_loads']} B loads per thread "
                   f"> {SPILL_BYTES_MAX} B")
    return out


def build_rows(cap: Capture, records: dict) -> list[dict]:
    """One row per kernel, target, input dtype, fp32 matmul precision and compiled configuration, with the
    published sizes that launch it."""
    rows: dict = {}
    for launch in cap.launches:
        cfg = cap.configs[launch.config_key]
        w = launch.workload
        key = (cfg.key, w.family, w.dtype, w.fp32_precision)
        row = rows.get(key)
        if row is None:
            record = records[cfg.key]
            consts = cfg.constants()
            row = rows[key] = {
                "family": w.family, "kernel": cfg.kernel, "target": cfg.target.name, "dtype": w.dtype,
                "precision": consts.get("DOT_PRECISION"), "fp32_matmul_precision": w.fp32_precision,
                "constexprs": consts, "signature": cfg.signature_str(), "num_warps": cfg.options.num_warps,
                "num_stages": cfg.options.num_stages,
                **{k: v for k, v in record.items() if k not in ("num_warps", "num_stages", "cached")},
                "shared_limit": cfg.target.shared_limit, "violations": violations(record, cfg.target),
                "sizes": [], "config": cfg.key,
            }
        if w.size not in row["sizes"]:
            row["sizes"].append(w.size)
    return sorted(rows.values(), key=lambda r: (r["family"], r["kernel"], r["target"], r["dtype"],
                                                r["fp32_matmul_precision"], json.dumps(r["constexprs"])))


def describe(row: dict, what: str) -> str:
    """``what`` of one row, with what identifies the configuration: kernel, target, dtype, constexprs, warps."""
    consts = ", ".join(f"{k}={v}" for k, v in row["constexprs"].items())
    return f"{row['kernel']} on {row['target']} {row['dtype']} [{consts}] num_warps={row['num_warps']}: {what}"


def failures(rows: list[dict]) -> list[str]:
    """One line per distinct failure (configurations that differ only in argument alignment merge), with the
    published sizes that launch it."""
    merged: dict = {}
    for r in rows:
        for v in r["violations"]:
            sizes = merged.setdefault(describe(r, v), [])
            sizes.extend(s for s in r["sizes"] if s not in sizes)
    return [f"{line} (sizes: {'; '.join(sizes[:3])}{f'; +{len(sizes) - 3} more' if len(sizes) > 3 else ''})"
            for line, sizes in merged.items()]


def summary(rows: list[dict]) -> list[dict]:
    """Per kernel, target and dtype (and fp32 matmul precision): the worst registers, spills and shared memory."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["family"], r["kernel"], r["target"], r["dtype"], r["fp32_matmul_precision"]), []).append(r)
    out = []
    for (_, kernel, target, dtype, fp32), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        out.append({
            "kernel": kernel.removeprefix("_").removesuffix("_kernel"), "target": target,
            # the torch setting shows where it is not the default (--fp32-precisions)
            "dtype": dtype if fp32 == "highest" else f"{dtype} ({fp32})", "dot": rs[0]["precision"] or "-",
            "configs": len(rs),
            "regs": max((r["registers"] for r in ok), default="-"),
            "spill_st": max((r["spill_stores"] for r in ok), default="-"),
            "spill_ld": max((r["spill_loads"] for r in ok), default="-"),
            "smem": max((r["shared"] for r in ok), default="-"),
            "smem_limit": rs[0]["shared_limit"],
            "status": "FAIL" if any(r["violations"] for r in rs) else "ok",
        })
    return out


def jit_kernels() -> dict[str, list[str]]:
    """Module -> names of the launchable @triton.jit functions of kernels/ (STYLE.md: kernels end in ``_kernel``;
    the other @triton.jit functions are device helpers they call)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import KernelInterface

    import fastdistill.kernels as package

    out = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names = sorted(name for name, value in vars(module).items()
                       if isinstance(value, KernelInterface) and name.endswith("_kernel"))
        if names:
            out[module.__name__] = names
    return out


def uncovered(cap: Capture, families: Iterable[str]) -> list[str]:
    """@triton.jit kernels that no workload launched: those of the kernel files of ``families``, and any of a
    kernel file without a workload family here (a new kernel needs a workload)."""
    launched = {(cfg.module, cfg.kernel) for cfg in cap.configs.values()}
    out = []
    for module, names in jit_kernels().items():
        stem = module.rsplit(".", 1)[-1]
        if stem in families or stem not in FAMILIES:
            out.extend(f"{module}.{name}" for name in names if (module, name) not in launched)
    return out


def _modified_kernel_files() -> list[str]:
    """Files of kernels/ that differ from git_sha: the results describe the working tree, not the commit."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "kernels"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent.parent)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.stdout.splitlines()]


def run(work: list[Workload], targets=tuple(TARGETS), jobs: int = 1, cache: Path | None = None,
        progress: Callable[[int, int], None] | None = None) -> dict:
    """Capture, compile and check; the JSON record (rows, failures, unsupported sizes, uncovered kernels)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels_aot: TRITON_INTERPRET=1 turns @triton.jit into the interpreter, which compiles "
                           "nothing; run it without (tests/kernels/test_aot_compile.py runs it in a subprocess)")
    import triton
    from triton import knobs

    start = time.perf_counter()
    cap = capture(work, [TARGETS[t] for t in targets])
    records = compile_all(cap.configs, cache, jobs=jobs, progress=progress)
    rows = build_rows(cap, records)
    return {
        "benchmark": "kernels_aot",
        "triton": triton.__version__,
        "ptxas": knobs.nvidia.ptxas.version,
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "kernels_modified": _modified_kernel_files(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "targets": {name: dataclasses.asdict(TARGETS[name]) for name in targets},
        "spill_bytes_max": SPILL_BYTES_MAX,
        "configs": len(cap.configs),
        "compiled": sum(1 for r in records.values() if not r["cached"]),
        "seconds": round(time.perf_counter() - start, 1),
        "failures": failures(rows),
        "unsupported": cap.unsupported,
        "uncovered": uncovered(cap, {w.family for w in work}),
        "rows": rows,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES,
                        help="kernel files to compile (default: all)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                        help="compile targets (default: sm_80 and sm_90)")
    parser.add_argument("--sizes", default="published", choices=["published", "ci"],
                        help="published: every size of the module docstring; ci: the test's subset (CI_SIZES)")
    parser.add_argument("--fp32-precisions", nargs="+", default=["highest"], choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision values to launch the float32 kernels under "
                             "(highest, torch's default, is what a run gets unless it allows TF32)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiles (forked processes; default: all cores)")
    parser.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: {cache_dir()})")
    parser.add_argument("--out", type=Path, default=OUT_PATH, help="JSON written (default: %(default)s)")
    args = parser.parse_args(argv)

    reason = toolchain_missing()
    if os.environ.get("TRITON_INTERPRET") == "1":
        reason = "TRITON_INTERPRET=1 replaces every @triton.jit function with the interpreter; unset it"
    if reason:
        print(f"kernels_aot: {reason}", file=sys.stderr)
        return 2

    def progress(done, total):
        # a count rewritten in place on a terminal; a log gets the last one only
        if done == total or (sys.stdout.isatty() and done % 10 == 0):
            print(f"\rcompiled {done}/{total}", end="\n" if done == total else "", flush=True)

    work = workloads(args.families, args.sizes, args.fp32_precisions)
    record = run(work, args.targets, jobs=args.jobs, cache=None if args.no_cache else cache_dir(), progress=progress)
    print_table(summary(record["rows"]), ["kernel", "target", "dtype", "dot", "configs", "regs", "spill_st",
                                          "spill_ld", "smem", "smem_limit", "status"])
    refused: dict = {}
    for u in record["unsupported"]:
        refused.setdefault(u["reason"], []).append(f"{u['target']} {u['dtype']} {u['size']}")
    for reason, where in refused.items():
        print(f"not compiled, the launch path refuses it ({len(where)} target/dtype/sizes, e.g. {where[0]}): {reason}")
    for name in record["uncovered"]:
        print(f"UNCOVERED: {name} is launched by no workload in benchmarks/kernels_aot.py")
    print(f"{record['configs']} configurations ({record['compiled']} compiled, the rest cached) in "
          f"{record['seconds']} s; triton {record['triton']}, ptxas {record['ptxas']}")
    for line in record["failures"]:
        print(f"FAIL {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 1 if record["failures"] or record["uncovered"] else 0


if __name__ == "__main__":
    sys.exit(main())
