"""Difficulty labels for RL prompts: each prompt's pass rate over several samples.

The recipe labels difficulty by sampling the SFT model several times (the paper: 10) at a
relatively high temperature; the sampler's curriculum and priorities start from these rates.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kimivl_rl.config import Config
from kimivl_rl.data.rows import DataError, RowLoader, raw_rows, row_number
from kimivl_rl.infra.ownership import (SHA_KEY, check_replaceable_file, sha256_of, sidecar_path,
                                       staging_file)

log = logging.getLogger(__name__)


def check_label_paths(in_file: Path, out_file: Path) -> None:
    """Refuse, before anything starts, an output that is not beside the input or that would
    overwrite a file kimivl-rl did not write: an existing ``out_file`` is replaced only when its
    sidecar ``<out stem>.stats.json``, written with it, records its current sha256."""
    if out_file.resolve().parent != in_file.resolve().parent:
        raise DataError(f"{out_file}: write labels next to {in_file} (image paths are relative "
                        f"to the data file's directory)")
    if out_file.suffix != in_file.suffix:
        raise DataError(f"{out_file}: the labels keep {in_file}'s format; name a {in_file.suffix} file")
    check_replaceable_file(out_file, "--out", "Choose another --out file, or move that one away.")


def write_labelled(in_file: Path, out_file: Path, rates: dict[int, float]) -> None:
    """``in_file``'s rows numbered in ``rates``, each with its ``pass_rate``, in ``in_file``'s
    own format: JSON rows keep every key, a Parquet table (embedded images and all) gains the
    column. Rows the loader skipped (``data.bad_rows: skip``) are left out."""
    if in_file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        numbers = sorted(rates)
        table = pq.read_table(in_file).take([n - 1 for n in numbers])
        if "pass_rate" in table.column_names:
            table = table.drop_columns(["pass_rate"])
        pq.write_table(table.append_column("pass_rate", pa.array([rates[n] for n in numbers],
                                                                 pa.float64())), out_file)
        return
    rows = [{**row, "pass_rate": rates[n]} for n, row in raw_rows(in_file) if n in rates]
    with open(out_file, "x", encoding="utf-8") as f:
        if in_file.suffix == ".json":
            json.dump(rows, f, ensure_ascii=False)
        else:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def label_difficulty(cfg: Config, model_path: str, in_file: Path, out_file: Path) -> dict:
    """Write ``in_file``'s rows to ``out_file`` with ``pass_rate`` set, and the statistics with
    the file's sha256 to its sidecar (``check_label_paths``); return the statistics."""
    from kimivl_rl.system.actors import sample_and_score

    check_label_paths(in_file, out_file)
    prompts = RowLoader.prompts(cfg.data, str(in_file.resolve()))  # an absolute path ignores data.dir
    k = cfg.sampler.label_samples
    rates: list[float] = []
    for chunk, _, scores in sample_and_score(cfg, model_path, prompts, k,
                                             cfg.sampler.label_temperature, "labelling"):
        rates += [sum(s.score for s in scores[i * k:(i + 1) * k]) / k for i in range(len(chunk))]
    staging = staging_file(out_file)
    try:
        write_labelled(in_file, staging, {row_number(p.source): rate for p, rate in zip(prompts, rates)})
        stats = {"prompts": len(rates), "samples_per_prompt": cfg.sampler.label_samples,
                 "mean_pass_rate": sum(rates) / max(1, len(rates)),
                 "always_solved": sum(r == 1.0 for r in rates),
                 "never_solved": sum(r == 0.0 for r in rates),
                 "output": str(out_file), SHA_KEY: sha256_of(staging)}
        os.replace(staging, out_file)  # an interrupted run never leaves a half-written file
    finally:
        staging.unlink(missing_ok=True)
    sidecar_path(out_file).write_text(json.dumps(stats, indent=1))
    log.info("difficulty labels written to %s: %s", out_file, stats)
    return stats
