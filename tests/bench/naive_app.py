"""The baseline the gateway is measured against: FastAPI calling ONNX Runtime in process, per
request, with the same model and the same online features read from Redis. It captures nothing,
routes nothing and batches nothing. Run: `SLUICE_MODEL_REPOSITORY=... uvicorn --factory
tests.bench.naive_app:create_app`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from redis.asyncio import Redis

from services.common.settings import SluiceSettings
from services.features.client import feature_key
from services.inference.client import latest_version, load_manifest
from services.ingest.responses import JSONBody


def create_app() -> FastAPI:
    settings = SluiceSettings()
    root = settings.model_repository
    manifest = load_manifest(root, "fraud", latest_version(root, "fraud"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(root / "fraud" / manifest.version / "model.onnx"),
        options,
        providers=["CPUExecutionProvider"],
    )
    redis = Redis.from_url(settings.redis_url)
    online = [
        (s.name, s.entity, s.feature or s.name) for s in manifest.features if s.source == "online"
    ]
    app = FastAPI(default_response_class=JSONBody)

    @app.post("/v1/models/fraud/predict")
    async def predict(request: Request) -> dict:
        body = await request.json()
        features = body.get("features", {})
        ids = {"card": body["entity_id"], "merchant": features.get("merchant_id")}
        pipe = redis.pipeline(transaction=False)
        for entity in ("card", "merchant"):
            names = [f for _, e, f in online if e == entity]
            pipe.hmget(feature_key(entity, ids[entity]), names)
        card, merchant = await pipe.execute()
        stored = dict(zip([f for _, e, f in online if e == "card"], card, strict=True))
        stored |= dict(zip([f for _, e, f in online if e == "merchant"], merchant, strict=True))
        row = [
            float(stored[spec.feature or spec.name] or 0.0)
            if spec.source == "online"
            else float(features[spec.field or spec.name])
            for spec in manifest.features
        ]
        outputs = session.run(None, {manifest.input_name: np.array([row], dtype=np.float32)})
        return {"score": float(outputs[1][0][1]), "version": manifest.version}

    return app
