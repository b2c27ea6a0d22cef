"""The registered model's code, logged as MLflow "models from code": MLflow stores this file's
source with the model and runs it on load, so the model holds tensors, config, vocabulary and
source, and nothing pickled. It needs multimodel installed where it loads
(`mlflow models serve --env-manager local`).

Rows of `{task, input}` in (text, or an image / audio file base64-encoded), one prediction per
row out: the class name or the decoded text.
"""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc


class MultiModelPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from mm.predict import Predictor

        self.predictor = Predictor(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        records = (
            model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        )
        return [self.predictor.predict(str(row["task"]), row["input"]) for row in records]


mlflow.models.set_model(MultiModelPyfunc())
