"""A hub dataset id that resolves offline: tables written by a test, laid out in `datasets`' cache as a
previous download of that id leaves them, so `datasets.load_dataset(repo_id)` reads them with no network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd


def install_dataset_in_cache(repo_id: str, splits: dict[str, pd.DataFrame], cache: Path, tmp: Path,
                             config: str = "default") -> None:
    """Prepare ``splits`` with the packaged Parquet builder, then file them under ``repo_id`` in ``cache``
    (``datasets.config.HF_DATASETS_CACHE``), as configuration ``config``."""
    import datasets

    tmp.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, df in splits.items():
        files[split] = str(tmp / f"{split}.parquet")
        df.to_parquet(files[split])
    datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp / "prepare"))
    (built,) = [p for p in (tmp / "prepare" / "parquet").glob("*/*/*") if p.is_dir()]
    from datasets.naming import camelcase_to_snakecase

    owner, name = repo_id.split("/")
    name = camelcase_to_snakecase(name)  # as datasets names its cache directory and files
    dest = cache / f"{owner}___{name}" / config / "0.0.0" / built.name
    dest.mkdir(parents=True)
    for f in built.iterdir():
        if f.suffix in (".arrow", ".json"):
            shutil.copy(f, dest / f.name.replace("parquet-", f"{name}-"))
    info = json.loads((dest / "dataset_info.json").read_text())
    info.update(config_name=config, dataset_name=name, builder_name=name)
    (dest / "dataset_info.json").write_text(json.dumps(info))
