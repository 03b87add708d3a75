"""How long does the command line take to start? Wall time of a fresh process for ``medtransfer <command> --help``
of every command, a one-image ``medtransfer predict`` of a checkpoint, and ``python -c "import torch, lightning"``
as the reference, each the median of several runs (interleaved, so a burst of load hits all alike).

The commands whose ``--help`` is cached (``medtransfer.commands.help_cache``) are timed twice: ``<command> --help``
with an emptied cache before every run (cold: the live parser, as on a first call after a change), and
``<command> --help, cached`` from a cache filled once beforehand as ``make setup`` fills it (warm).

Targets: every ``--help`` within 1.5 s; the one-image predict within 1.5 s of the reference. Each entry also lists
which heavy libraries its process imported. Results go under ``--label`` (e.g. ``before``/``after``) in the JSON,
beside the labels already there.
Usage: python bench/startup.py [--label after] [--repeats 5] [--src src] [--out bench/results/startup.json]
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDTRANSFER_DATA_DIR") or REPO.parent / "shared" / "data")
COMMANDS = ("fit", "validate", "test", "predict", "serve", "evaluate", "compare", "baseline", "learning-curve",
            "search", "lr-find", "explain-eval", "prepare")  # fmt: skip
HEAVY = ("torch", "lightning", "timm", "torchmetrics", "albumentations", "mlflow", "optuna", "sklearn", "matplotlib",
         "pydicom", "captum", "litdata", "scipy", "pandas", "cv2")  # fmt: skip
#: The commands whose ``--help`` the cache answers when warm; checkouts without a cache time them cold only.
CACHED_HELP = ("fit", "validate", "test", "serve", "baseline")
HELP_TARGET_S = 1.5
PREDICT_MARGIN_S = 1.5
#: Runs the console script's ``main`` with the given argv (``sys.argv[0]`` as the console script's, which the help
#: cache keys by), then prints which heavy libraries the process imported.
_PROBE = (
    "import sys, json\nsys.argv[0] = 'medtransfer'\nfrom medtransfer.entry import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    "print('\\n' + json.dumps(sorted(m for m in {HEAVY} if m in sys.modules)), file=sys.stderr)"
)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), Python {platform.python_version()}"


def write_checkpoint(path: Path) -> None:
    """A 64-px EfficientNet-Lite0 medtransfer checkpoint (random weights: start-up does not depend on them), with
    options that earlier versions also read, so ``--label before --src OLD/src`` loads it."""
    from medtransfer.models.classifier import ClassifierModule

    model = ClassifierModule(backbone="tf_efficientnet_lite0", pretrained="none", confidence_score="margin")
    input_spec = {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "channels": 3}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.0", "class_names": ["normal", "pneumonia"], "input": input_spec},
               path)  # fmt: skip


def write_image(path: Path) -> None:
    """One real X-ray: the first PneumoniaMNIST test image."""
    with np.load(DATA / "pneumoniamnist.npz") as data:
        Image.fromarray(data["test_images"][0]).save(path)


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, list[str]]:
    """Seconds the process ran, and the heavy libraries it imported (for probe runs)."""
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[-4:])} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    last = done.stderr.strip().splitlines()[-1:] if argv[1] == "-c" and "entry" in argv[2] else []
    return seconds, json.loads(last[0]) if last else []


def warm_cache(env: dict[str, str], cwd: Path) -> bool:
    """Fill the help cache of ``env`` as ``make setup`` does; ``False`` for a checkout that has no help cache."""
    code = "from medtransfer.entry import warm_help_cache\nwarm_help_cache()"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0 and "warm_help_cache" not in done.stderr:
        raise RuntimeError(f"warming the help cache failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return done.returncode == 0


def startup_benchmark(label: str, repeats: int, src: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "PYTHONWARNINGS": "ignore"}
    probe = _PROBE.replace("{HEAVY}", repr(set(HEAVY)))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_checkpoint(tmp / "model.ckpt")
        write_image(tmp / "image.png")
        cold_cache = tmp / "cold-cache"  # emptied before every run
        cold = {**env, "XDG_CACHE_HOME": str(cold_cache)}
        warm = {**env, "XDG_CACHE_HOME": str(tmp / "warm-cache")}
        cases = {f"{command} --help": ([sys.executable, "-c", probe, command, "--help"], cold) for command in COMMANDS}
        if warm_cache(warm, tmp):
            cases |= {f"{command} --help, cached": ([sys.executable, "-c", probe, command, "--help"], warm)
                      for command in CACHED_HELP}  # fmt: skip
        predict = ["predict", str(tmp / "image.png"), str(tmp / "model.ckpt"), "--output", str(tmp / "out.csv")]
        cases["predict one image"] = ([sys.executable, "-c", probe, *predict, "--device", "cpu"], cold)
        cases["import torch, lightning"] = ([sys.executable, "-c", "import torch, lightning"], cold)
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in cases}
        imported: dict[str, list[str]] = {}
        for _ in range(repeats):
            for name, (argv, case_env) in cases.items():
                shutil.rmtree(cold_cache, ignore_errors=True)
                seconds, heavy = timed(argv, case_env, tmp)
                times[name].append(seconds)
                imported[name] = heavy
        load_after = os.getloadavg()[0]
    medians = {name: statistics.median(values) for name, values in times.items()}

    def over_target(suffix: str) -> list[str]:
        return sorted(n for n, v in medians.items() if n.endswith(suffix) and v > HELP_TARGET_S)

    reference = medians["import torch, lightning"]
    result = {
        "median_s": {name: round(value, 2) for name, value in medians.items()},
        "runs_s": {name: [round(v, 2) for v in values] for name, values in times.items()},
        "heavy_imports": {name: names for name, names in imported.items() if name != "import torch, lightning"},
        "predict_minus_reference_s": round(medians["predict one image"] - reference, 2),
        "help_over_target": over_target("--help"),  # cold: the live parser
        "cached_help_over_target": over_target(", cached"),
        "repeats": repeats,
        "load_average_1min": [round(load_before, 2), round(load_after, 2)],
    }
    everything = json.loads(out.read_text()) if out.is_file() else {}
    everything.update({"machine": machine(), "targets": {"help_s": HELP_TARGET_S,
                                                         "predict_minus_reference_s": PREDICT_MARGIN_S}})  # fmt: skip
    everything.setdefault("results", {})[label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(everything, indent=2) + "\n")
    return result


def print_table(result: dict) -> None:
    print(f"{'case':<30} {'median s':>9}  heavy libraries imported")
    for name, value in result["median_s"].items():
        print(f"{name:<30} {value:>9.2f}  {', '.join(result['heavy_imports'].get(name, [])) or '-'}")
    cold, cached = (", ".join(result[key]) or "none" for key in ("help_over_target", "cached_help_over_target"))
    print(f"predict - reference: {result['predict_minus_reference_s']:.2f} s (target <= {PREDICT_MARGIN_S} s); "
          f"--help over {HELP_TARGET_S} s: cold {cold}, cached {cached}; "
          f"load average {result['load_average_1min']}")  # fmt: skip


if __name__ == "__main__":
    from jsonargparse import auto_cli

    def main(label: str = "after", repeats: int = 5, src: Path = REPO / "src",
             out: Path = REPO / "bench/results/startup.json") -> None:  # fmt: skip
        """Time the start-up of every command and write it under ``label``."""
        print_table(startup_benchmark(label, repeats, src, out))

    auto_cli(main)
