"""The ``mlflow.pyfunc`` flavour of a checkpoint (MLflow "models from code": nothing pickled).

    model = mlflow.pyfunc.load_model("models:/<stream>-ttt@live")
    model.predict(pd.DataFrame({"text": [...]}))                                  # scores
    model.predict(pd.DataFrame({"text": [...]}), params={"mode": "generate"})     # continues

Each text is read as a new document of the stream would be (pipeline.state.adapted_model: the
stream's TTT config, its slow weights, fresh fast weights; texts do not affect one another):
``score`` returns the prequential loss per text; ``generate`` reads the text, then continues
it greedily for ``max_new_tokens``. The base model is loaded from the path the checkpoint
records (``base_model`` in the model config: a directory, or a registered model fetched and
verified as the readers do), and its weights' sha256 is checked. A version of the global scope
holds one state (one reader, or the learner's). A version of the per_key scope loads, without a
choice, as the model a new tenant starts from; one tenant's model is
``load_model(uri, model_config={"key": ...})``, ``key`` a state's name (the results'
``state_key``; ``TenantKeys.state_key_of`` gives it for a tenant's key), and ``"reader"`` narrows
the choice where needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TTTCheckpointModel(PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from pipeline.state.adapted_model import choose_state, load_adapted_model, verified_state_bytes
        from pipeline.state.base_model import DEFAULT_CACHE_DIR, local_model_dir
        from pipeline.state.checkpoint import base_model_id, parse_manifest

        config = context.model_config
        root = Path(context.artifacts["checkpoint"])
        manifest = parse_manifest((root / "manifest.json").read_bytes())
        # A directory, or a registered model (from the MLflow this model is loaded from).
        base, _ = local_model_dir(config["base_model"], None, DEFAULT_CACHE_DIR)
        if base_model_id(base)["weights_sha256"] != manifest["base_model"]["weights_sha256"]:
            raise ValueError(f"{base}: weights differ from the checkpoint's base model")
        model_config = manifest.get("model_config") or {}
        _, entry = choose_state(manifest["readers"], config.get("reader"), config.get("key"),
                                f"{manifest['stream']} checkpoint (load_model(..., model_config={{'reader': ..., 'key': ...}}))",
                                model_config.get("scope"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.adapted = load_adapted_model(base, model_config, verified_state_bytes(root, entry) if entry else None)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        params = params or {}
        mode = params.get("mode", "score")
        texts = list(model_input["text"]) if hasattr(model_input, "__getitem__") else list(model_input)
        rows = []
        # No no_grad here: a session with the gradient objective takes its own steps.
        with self.adapted.bound():
            for text in texts:
                session = self.adapted.new_session()
                ids = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"])[None]
                out = session.feed(ids)
                row = {"tokens": ids.shape[1], "loss": float(out.nll[0, 1:].double().mean()) if ids.shape[1] > 1 else None}
                if mode == "generate":
                    generated = []
                    logits = out.logits[:, -1]
                    for _ in range(int(params.get("max_new_tokens", 32))):
                        token = logits.argmax(-1, keepdim=True)
                        generated.append(int(token))
                        logits = session.feed(token).logits[:, -1]
                    row["generated"] = self.tokenizer.decode(generated)
                rows.append(row)
        return pd.DataFrame(rows)


mlflow.models.set_model(TTTCheckpointModel())
