"""Inference throughput: studies/s for prepare (DICOM → tensor) + infer, the model loaded once.

    .venv/bin/python bench/inference.py [--studies 64] [--batch 8,32] [--workers 2] [--device auto]

On the synthetic cohort (DX studies of 1-2 views + their FHIR timelines; the timelines are encoded from
the bundles offline, so FHIR is not measured here — see bench/fhir_timeline.py):

* prepare: `transforms.load_study_image` (read, select series, decode, resample, normalise), one process;
* infer, reference = batch size 1 (`Predictor.predict`, what the gpu worker does per task), then
  batched across studies (`inference.batch.predict_batch`); ratio batched / batch 1;
* prepare + infer: one process doing both in turn, and ``--workers`` prepare processes feeding
  batched inference in the main process; the target is ≥ 5 studies/s on 2 CPU cores;
* on CUDA (when torch sees a GPU): batch 1 in float32 against batched bfloat16 autocast with pinned
  memory and channels-last, GPU utilisation sampled with nvidia-smi, and the ratio GPU / CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

TARGET = 5.0  # studies/s, prepare + infer, CPU, default 2D model


_CARD = None


def _init_worker(card_path: str) -> None:
    global _CARD
    from dicom_fusion.inference.card.model import load_card

    torch.set_num_threads(1)
    _CARD = load_card(Path(card_path))


def _prepare(files: list[str]) -> np.ndarray:
    from dicom_fusion.inference.data.images import load_study_image

    return load_study_image([Path(f) for f in files], _CARD).array  # type: ignore[arg-type]


def rate(n: int, secs: float) -> str:
    return f"{n / secs:8.1f} studies/s ({secs / n * 1000:7.1f} ms/study)"


def timed(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of ``repeat`` runs (the machine is shared: medians, not means)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class GpuSampler(threading.Thread):
    """GPU utilisation (%) from nvidia-smi every 100 ms while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop_event = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.available and not self.stop_event.wait(0.1):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5, check=False).stdout
                self.samples.append(float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                continue

    def stop(self) -> str:
        self.stop_event.set()
        self.join()
        if not self.samples:
            return "n/a (nvidia-smi missing)"
        return f"mean {statistics.mean(self.samples):.0f} %, max {max(self.samples):.0f} %"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=64)
    ap.add_argument("--batch", default="8,32", help="batch sizes to compare with batch size 1")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="prepare processes")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: CUDA too when available)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the inference process (the worker's default, worker.torch_threads, is 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",") if b]

    from dicom_fusion.fhir.events import events_from_bundle
    from dicom_fusion.inference.card.model import default_card_path
    from dicom_fusion.inference.data.images import load_study_image
    from dicom_fusion.inference.data.timeline_tensor import encode_timeline
    from dicom_fusion.inference.serve.batch_predict import BatchOptions, predict_batch, prepare_model
    from dicom_fusion.inference.serve.predict import Predictor
    from dicom_fusion.inference.synth.generate import generate_cohort
    from dicom_fusion.service.jobs.study_context import study_facts

    card_path = default_card_path()
    cpu = Predictor.load(card_path, device="cpu")
    card = cpu.card
    print(f"model {card.name} {card.version}: encoder {card.image.encoder}, {card.image.spatial_dims}D "
          f"{'x'.join(map(str, card.image.size))}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as d:
        cohort = generate_cohort(args.studies, Path(d) / "cohort", args.seed, progress=False)
        studies = [sorted(str(f) for f in Path(p.study_dir).glob("*.dcm")) for p in cohort]
        n = len(studies)
        n_files = sum(len(s) for s in studies)
        print(f"{n} studies, {n_files} DX instances")

        # -- prepare ------------------------------------------------------------------------------
        t0 = time.perf_counter()
        images = [load_study_image([Path(f) for f in files], card) for files in studies]
        t_prep = time.perf_counter() - t0
        t0 = time.perf_counter()
        timelines = []
        for p, files in zip(cohort, studies, strict=True):
            events = events_from_bundle(json.loads(Path(p.bundle_path).read_text()),
                                        resource_types=card.timeline.resource_types,
                                        target_units=card.timeline.target_units)
            timelines.append(encode_timeline(events, study_facts(Path(files[0])).time, card.timeline))
        t_tl = time.perf_counter() - t0
        print(f"prepare (1 process)            {rate(n, t_prep)}")
        print(f"timeline encode (from bundles) {rate(n, t_tl)}  [FHIR fetch not included]")

        # -- infer on the CPU -----------------------------------------------------------------------
        for _ in range(3):  # warm-up: oneDNN builds its kernels per input shape
            cpu.predict(images[0], timelines[0])
            for b in batches:
                predict_batch(cpu, images[:b], timelines[:b])
        t1 = timed(lambda: [cpu.predict(i, t) for i, t in zip(images, timelines, strict=True)])
        print(f"infer CPU batch 1 (reference)  {rate(n, t1)}")
        cpu_rates = {1: n / t1}
        for b in batches:
            def run_batched(b: int = b) -> None:
                for k in range(0, n, b):
                    predict_batch(cpu, images[k:k + b], timelines[k:k + b])
            tb = timed(run_batched)
            cpu_rates[b] = n / tb
            print(f"infer CPU batch {b:<3}            {rate(n, tb)}   ratio vs batch 1: {t1 / tb:.2f}")

        # -- prepare + infer ---------------------------------------------------------------------------
        def serial() -> None:
            for files, tl in zip(studies, timelines, strict=True):
                cpu.predict(load_study_image([Path(f) for f in files], card), tl)

        t_serial = timed(serial, repeat=1)
        print(f"prepare + infer, 1 process, batch 1          {rate(n, t_serial)}")
        best_b = max(batches, key=lambda b: cpu_rates[b]) if batches else 1
        with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(str(card_path),)) as pool:
            list(pool.map(_prepare, studies[:args.workers]))  # start the workers (imports) before timing
            t0 = time.perf_counter()
            prepared = pool.map(_prepare, studies, chunksize=2)
            buf: list[np.ndarray] = []
            done = 0
            for arr in prepared:
                buf.append(arr)
                if len(buf) == best_b:
                    predict_batch(cpu, buf, timelines[done:done + len(buf)])
                    done += len(buf)
                    buf = []
            if buf:
                predict_batch(cpu, buf, timelines[done:done + len(buf)])
                done += len(buf)
            t_par = time.perf_counter() - t0
        best = max(n / t_serial, n / t_par)
        print(f"prepare + infer, {args.workers} prepare processes, batch {best_b:<3} {rate(n, t_par)}")
        print(f"ratio best prepare+infer / target ({TARGET:g} studies/s on CPU): {best / TARGET:.2f}"
              f"  ({'meets' if best >= TARGET else 'misses'} the target)")

        # -- CUDA -----------------------------------------------------------------------------------
        if args.device in ("auto", "cuda") and torch.cuda.is_available():
            gpu = Predictor.load(card_path, device="cuda")
            print(f"CUDA: {torch.cuda.get_device_name(0)}")
            for _ in range(3):
                gpu.predict(images[0], timelines[0])
            torch.cuda.synchronize()
            g1 = timed(lambda: [gpu.predict(i, t) for i, t in zip(images, timelines, strict=True)])
            print(f"infer GPU batch 1 fp32         {rate(n, g1)}   GPU/CPU ratio (batch 1): {t1 / g1:.2f}")
            options = BatchOptions.for_device(gpu.device)
            prepare_model(gpu, options)
            reps = max(1, 4096 // n)  # enough work to see the GPU busy
            big_images, big_tls = images * reps, timelines * reps
            for b in sorted({*batches, 128, 256}):
                predict_batch(gpu, big_images[:b], big_tls[:b], options=options)
                torch.cuda.synchronize()
                sampler = GpuSampler()
                sampler.start()
                t0 = time.perf_counter()
                for k in range(0, len(big_images), b):
                    predict_batch(gpu, big_images[k:k + b], big_tls[k:k + b], options=options)
                torch.cuda.synchronize()
                tg = time.perf_counter() - t0
                util = sampler.stop()
                print(f"infer GPU batch {b:<3} {options.autocast_dtype} pinned channels-last "
                      f"{rate(len(big_images), tg)}  GPU util {util}; GPU/CPU ratio vs CPU batch 1: "
                      f"{len(big_images) / tg / cpu_rates[1]:.1f}")
        elif args.device == "cuda":
            print("CUDA requested but torch sees no GPU here (CPU build of torch, or no device)", file=sys.stderr)
            return 2
        else:
            print("CUDA: not available here (CPU build of torch); GPU rows skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
