"""MLflow stores for tests, made by copying one that MLflow created once per test process."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def mlflow_store(folder: Path, name: str = "mlruns.db") -> str:
    """A tracking URI for a new SQLite store ``folder/name``, a copy of one MLflow made once in this process's
    temp folder (the run's own: conftest). MLflow creates a new store by running its ~70 schema migrations
    (~2.5 s of CPU), which every test with a store of its own would otherwise pay again; opening the copy, it
    finds the schema current. An existing store is left as it is."""
    db = Path(folder) / name
    if not db.exists():
        template = Path(tempfile.gettempdir(), "mlflow-template", "mlruns.db")
        if not template.exists():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            template.parent.mkdir(parents=True, exist_ok=True)
            made = template.with_suffix(".new")
            SqlAlchemyStore(f"sqlite:///{made}", str(template.parent / "mlartifacts")).engine.dispose()
            made.rename(template)
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
    return f"sqlite:///{db}"
