"""A bare FastAPI endpoint of the same shape as /v1/keys/{key}/sign, without token, auth or audit.

Served by the same uvicorn settings as ``tokenbridge serve`` (h11/httptools and asyncio
or uvloop: whatever this environment picks for the service too).
"""

from __future__ import annotations

import base64
import hashlib

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

app = FastAPI()


class SignRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: str
    data: str | None = None
    digest: str | None = None


class SignResponse(BaseModel):
    signature: str
    algorithm: str
    key: str
    key_label: str


@app.post("/v1/keys/{key}/sign")
async def sign(key: str, body: SignRequest) -> SignResponse:
    digest = hashlib.sha256(base64.b64decode(body.data or "")).digest()
    return SignResponse(signature=base64.b64encode(digest * 2).decode(), algorithm=body.algorithm, key=key,
                        key_label=key)
