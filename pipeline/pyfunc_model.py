"""The ``mlflow.pyfunc`` flavour of a checkpoint (MLflow "models from code": nothing pickled).

    model = mlflow.pyfunc.load_model("models:/<stream>-ttt@live")
    model.predict(pd.DataFrame({"text": [...]}))                                  # scores
    model.predict(pd.DataFrame({"text": [...]}), params={"mode": "generate"})     # continues

Each text is read from the checkpoint's adapted state (a copy per text, so texts do not affect
one another): ``score`` returns the prequential loss per text; ``generate`` reads the text,
then continues it greedily for ``max_new_tokens``. The base model is loaded from the path the
checkpoint records (``base_model`` in the model config), and its weights' sha256 is checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class TTTCheckpointModel(PythonModel):
    def load_context(self, context) -> None:
        import hashlib
        import json

        import torch
        from safetensors.torch import load
        from transformers import AutoTokenizer

        from pipeline.checkpoint import base_model_id
        from ttt_model.patch import configure_ttt, load_ttt_model
        from ttt_model.state import FastWeightState

        config = context.model_config
        root = Path(context.artifacts["checkpoint"])
        manifest = json.loads((root / "manifest.json").read_text())
        base = Path(config["base_model"])
        if base_model_id(base)["weights_sha256"] != manifest["base_model"]["weights_sha256"]:
            raise ValueError(f"{base}: weights differ from the checkpoint's base model")
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.model = load_ttt_model(base, dtype=torch.float32).eval()
        if config.get("ttt_overrides"):
            configure_ttt(self.model, dict(config["ttt_overrides"]))
        worker = config.get("worker") or sorted(manifest["workers"])[0]
        entries = manifest["workers"][worker]
        entry = next((e for e in entries if config.get("key") in (None, e["key"])), None)
        self.state = FastWeightState.for_model(self.model)
        if entry is not None:
            data = (root / entry["file"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"{entry['file']}: sha256 does not match the manifest")
            self.state.load_state_dict(load(data))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        from ttt_model.session import TTTSession

        params = params or {}
        mode = params.get("mode", "score")
        texts = list(model_input["text"]) if hasattr(model_input, "__getitem__") else list(model_input)
        rows = []
        for text in texts:
            session = TTTSession(self.model, self.state.clone())
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
