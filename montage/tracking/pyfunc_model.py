"""MLflow "models from code" entry: a montage checkpoint served as a pyfunc model.

MLflow executes this file when loading the model; the checkpoint travels as the
``checkpoint`` artifact and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

# predict() is deliberately unannotated (see below); MLflow would warn about it at class creation
warnings.filterwarnings("ignore", message=r"Add type hints to the `predict` method")


class MontageCheckpointModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from montage.platform.inference import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        """``model_input``: a list or array of uint8 RGB images (H, W, 3) → list of outputs.

        Left unannotated on purpose: MLflow turns type hints into an input schema, and
        image arrays of any size have none it can express."""
        return self.predictor(list(model_input))


mlflow.models.set_model(MontageCheckpointModel())
