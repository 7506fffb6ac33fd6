"""What a run leaves behind: ``metrics.json``, ``examples.png``, the printed test table, the Hydra record beside
the outputs, and the run config and test table in the loggers."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def table_rows(results: dict[str, Any]) -> list[str]:
    """The rows of a test table in order: the measurement, the reference rows, the model."""
    middle = [k for k, v in results.items() if k not in ("measurement", "model") and isinstance(v, dict) and "psnr" in v]
    return [k for k in ("measurement", *middle, "model") if k in results]


def format_table(results: dict[str, Any]) -> str:
    fmt = lambda v, spec: "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)  # noqa: E731
    lines = [f"{'test (' + str(results.get('n_images', '?')) + ' images)':<24}{'PSNR [dB]':>10}{'SSIM':>8}"]
    lines += [f"{r:<24}{fmt(results[r]['psnr'], '.2f'):>10}{fmt(results[r]['ssim'], '.4f'):>8}"
              for r in table_rows(results)]
    return "\n".join(lines)


def json_safe(obj: Any) -> tuple[Any, bool]:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN/inf), and whether any was."""
    found = False

    def walk(o):
        nonlocal found
        if isinstance(o, float) and not math.isfinite(o):
            found = True
            return None
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return walk(obj), found


def write_metrics(out_dir: Path, payload: dict[str, Any]) -> Path:
    """``metrics.json``, always valid JSON: non-finite numbers become null and set ``"non_finite": true``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    safe, found = json_safe(payload)
    if found:
        safe["non_finite"] = True
        log.warning("metrics.json: some values were not finite (written as null)")
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(safe, indent=2, allow_nan=False))
    return path


def examples_png(examples, out_dir: Path, n: int) -> Path | None:
    """``examples.png``: rows truth / measurement / reconstruction of the test images in ``examples``."""
    if examples is None:
        return None
    import torchvision

    x, y, xh = examples
    if x.shape[0] < n:
        log.warning("examples.png shows %d images: the test split has only %d (grid_images=%d)", x.shape[0],
                    x.shape[0], n)
    path = out_dir / "examples.png"
    torchvision.utils.save_image(torch.cat([x, y, xh]).float(), path, nrow=x.shape[0], padding=2)
    return path


def keep_hydra_record(out_dir: Path) -> None:
    """With ``paths.output_dir=<dir>`` the run's outputs leave Hydra's run directory, where Hydra wrote ``.hydra/``
    (the composed config, its overrides and choices): copy that record beside them, so ``jfb_ip.report`` and a
    reader of ``<dir>`` know what was run. Nothing to do outside a Hydra app or when the two are the same."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    record = Path(hc.runtime.output_dir) / (hc.output_subdir or ".hydra")
    if record.is_dir() and out_dir.resolve() != record.parent.resolve():
        shutil.copytree(record, out_dir / ".hydra", dirs_exist_ok=True)


def log_run_config(loggers: list, run_config: dict[str, Any]) -> None:
    """The full resolved run config and the Hydra choices (``choices.method``, ``choices.backward``, ...) to every
    logger. Lightning logs only the module's own hyperparameters, where the run config is not yet set."""
    from hydra.core.hydra_config import HydraConfig

    try:
        choices = {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra/")}
    except ValueError:
        choices = {}
    for lg in loggers:
        lg.log_hyperparams({**run_config, "choices": choices})


def log_test_results(loggers: list, results: dict[str, Any], examples: Path) -> None:
    """The test table to wandb: each row's PSNR/SSIM in the run summary (``test/model_psnr``: dashboards compare
    runs by it), the same rows as a ``test/table`` Table, and ``examples.png`` as the ``test/examples`` image."""
    from lightning.pytorch.loggers import WandbLogger

    rows = table_rows(results)
    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        for row in rows:
            for k in ("psnr", "ssim"):
                lg.experiment.summary[f"test/{row}_{k}"] = results[row][k]
        lg.log_table(key="test/table", columns=["row", "psnr", "ssim"],
                     data=[[r, results[r]["psnr"], results[r]["ssim"]] for r in rows])
        if examples.is_file():
            lg.log_image(key="test/examples", images=[str(examples)],
                         caption=["rows: truth / measurement / reconstruction"])
