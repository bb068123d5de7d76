"""Do torch.compile or ONNX Runtime help the LTDiff++ networks on the CPU?

Times the three networks of the engine on one batch of 4 slices of 512 x 512 (the CPU batch):
the encoder E, ONE evaluation of the latent denoiser and the decoder D, with each backend:

* eager float32;
* eager bf16 (where the CPU computes bf16 natively, AVX512-BF16 or AMX): the engine's default
  precision, i.e. E and D with bf16 bodies and float32 shortcuts, the denoiser under autocast;
* torch.compile (inductor, dynamic=False) with `torch._inductor.config.freezing = True`, which
  folds the weights into the graph and lets oneDNN pre-pack them, in float32 and in bf16;
* ONNX Runtime float32 (CPUExecutionProvider), if `onnxruntime` and `onnx` are importable. They
  are not dependencies of the project: install them into a scratch environment to try.

Prints seconds per batch (median of --repeat after --warmup runs), per slice, the ratio to eager
float32, and the compile / export time. Figures are wall clock: on a machine that is busy with
something else (a training run), compare the ratios, not the absolute times.

Run: `.venv/bin/python benchmarks/bench_cpu_backends.py [--threads 2] [--repeat 5]
[--backends eager-f32,eager-bf16,compile-f32,compile-bf16,ort-f32] [--weights W]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from engine.ltdiff.engine import autoencoder_autocast_dtype, denoiser_autocast_dtype
from engine.ltdiff.latent_diffusion import LatentDenoiser
from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder
from engine.ltdiff.weights import load_weights, shipped_weights_path

BACKENDS = ("eager-f32", "eager-bf16", "compile-f32", "compile-bf16", "ort-f32")
CHANNELS_LAST = torch.channels_last


class Encoder(nn.Module):
    def __init__(self, ae: UNetPlusPlusAutoencoder, body: torch.dtype | None) -> None:
        super().__init__()
        self.ae, self.body = ae, body

    def forward(self, x: Tensor) -> Tensor:
        return self.ae.encode(x, self.body)


class Decoder(nn.Module):
    def __init__(self, ae: UNetPlusPlusAutoencoder, body: torch.dtype | None) -> None:
        super().__init__()
        self.ae, self.body = ae, body

    def forward(self, z: Tensor) -> Tensor:
        return self.ae.decode(z, self.body)


class Denoiser(nn.Module):
    """One evaluation, under autocast to `amp` (None: float32), output float32 like the engine."""

    def __init__(self, den: LatentDenoiser, amp: torch.dtype | None) -> None:
        super().__init__()
        self.den, self.amp = den, amp

    def forward(self, z_t: Tensor, t: Tensor, cond: Tensor, series: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            out: Tensor = self.den(z_t, t, cond, series if series.shape[1] else None)
        return out.float()


def _time(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ort_runner(module: nn.Module, inputs: tuple[Tensor, ...], threads: int) -> Callable[[], Any]:
    import onnxruntime as ort  # noqa: PLC0415 (optional, not a project dependency)

    with tempfile.TemporaryDirectory(prefix="ltdiff-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        names = [f"in{k}" for k in range(len(inputs))]
        torch.onnx.export(
            module, inputs, str(path), input_names=names, opset_version=17, dynamo=False
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {
        name: t.contiguous().numpy()
        for name, t in zip(names, inputs, strict=True)
        if name in {i.name for i in session.get_inputs()}
    }
    return lambda: session.run(None, feed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, help="default: the shipped LTDiff++ weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = args.backends.split(",")
    unknown = set(wanted) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {BACKENDS}")

    weights, _ = load_weights(args.weights or shipped_weights_path())
    cpu = torch.device("cpu")
    ae = weights.build_autoencoder().to(memory_format=CHANNELS_LAST).eval()
    den = weights.build_denoiser().to(memory_format=CHANNELS_LAST).eval()
    if weights.denoiser_config is None:
        raise SystemExit("these weights have no denoiser")
    bf16_ae = autoencoder_autocast_dtype(cpu, "bf16")
    bf16_den = denoiser_autocast_dtype(cpu, "bf16")
    n, size, p = args.batch, args.size, weights.autoencoder_config.patch
    c_z = weights.autoencoder_config.latent_channels
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, size, size, generator=gen).contiguous(memory_format=CHANNELS_LAST)
    z = torch.randn(n, c_z, size // p, size // p, generator=gen)
    z = z.contiguous(memory_format=CHANNELS_LAST)
    t = torch.full(
        (n,), weights.schedule_config.num_train_timesteps - 1 if weights.schedule_config else 999
    )
    series = torch.zeros(n, weights.denoiser_config.condition_features)
    inputs: dict[str, tuple[Tensor, ...]] = {
        "encoder": (x,),
        "denoiser (1 eval)": (z, t, z * weights.latent_scale, series),
        "decoder": (z,),
    }

    def modules(
        dtype_ae: torch.dtype | None, dtype_den: torch.dtype | None
    ) -> dict[str, nn.Module]:
        return {
            "encoder": Encoder(ae, dtype_ae).eval(),
            "denoiser (1 eval)": Denoiser(den, dtype_den).eval(),
            "decoder": Decoder(ae, dtype_ae).eval(),
        }

    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {n} x {size} x {size}, "
        f"native bf16: {bf16_den is not None}; median of {args.repeat} after {args.warmup} warm-up"
    )
    print(f"{'network':18} {'backend':14} {'s/batch':>8} {'s/slice':>8} {'speedup':>11}  setup")
    baseline: dict[str, float] = {}
    for backend in wanted:
        if backend.endswith("bf16") and bf16_den is None:
            print(f"{backend}: skipped (this CPU has no native bf16; oneDNN would emulate it)")
            continue
        bf16 = backend.endswith("bf16")
        mods = modules(bf16_ae if bf16 else None, bf16_den if bf16 else None)
        for name, module in mods.items():
            setup = ""
            try:
                if backend.startswith("eager"):

                    def fn(module: nn.Module = module, name: str = name) -> Any:
                        with torch.inference_mode():
                            return module(*inputs[name])

                elif backend.startswith("compile"):
                    import torch._inductor.config as inductor_config  # noqa: PLC0415

                    inductor_config.freezing = True
                    compiled = torch.compile(module, dynamic=False)
                    start = time.perf_counter()
                    with torch.no_grad():
                        compiled(*inputs[name])
                    setup = f"compile {time.perf_counter() - start:.0f} s"

                    def fn(compiled: Any = compiled, name: str = name) -> Any:
                        with torch.no_grad():
                            return compiled(*inputs[name])

                else:
                    try:
                        import onnx  # noqa: F401, PLC0415
                        import onnxruntime  # noqa: F401, PLC0415
                    except ImportError:
                        print(f"{name:18} {backend:14} skipped: onnxruntime / onnx not importable")
                        continue
                    start = time.perf_counter()
                    fn = _ort_runner(module, inputs[name], args.threads)
                    setup = f"export {time.perf_counter() - start:.0f} s"
                seconds = _time(fn, args.warmup, args.repeat)
            except Exception as exc:  # noqa: BLE001 (a backend that fails is a result too)
                print(f"{name:18} {backend:14} failed: {type(exc).__name__}: {exc}"[:300])
                continue
            if backend == "eager-f32":
                baseline[name] = seconds
            ratio = f"{baseline[name] / seconds:10.2f}x" if name in baseline else f"{'':>11}"
            print(f"{name:18} {backend:14} {seconds:8.3f} {seconds / n:8.4f} {ratio}  {setup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
