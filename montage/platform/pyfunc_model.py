"""MLflow "models from code" entry: a montage checkpoint served as a pyfunc model.

MLflow executes this file when loading the model; the checkpoint travels as the
``checkpoint`` artifact and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class MontageCheckpointModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from montage.platform.inference import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"])

    def predict(self, context: Any, model_input: list[Any], params: dict[str, Any] | None = None) -> list[Any]:
        """``model_input``: a list or array of uint8 RGB images (H, W, 3)."""
        return self.predictor(list(model_input))


mlflow.models.set_model(MontageCheckpointModel())
