"""Python client for a running tokenbridge: what private software imports to delegate crypto.

    from tokenbridge.client import Client
    with Client("http://127.0.0.1:8155", secret="tb_...") as tb:
        sig = tb.sign("sign-rsa", b"hello", "rsa-pkcs1v15-sha256")

Errors come back as ``TokenbridgeError`` carrying the problem's stable ``code``.
``AsyncClient`` has the same methods, awaitable. ``uds=`` talks to the admin
socket instead (local operator; no secret needed).
"""

from __future__ import annotations

import base64
from typing import Any, Literal, Self

import httpx


class TokenbridgeError(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.retry_after = retry_after


def _raise_for_problem(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    retry = response.headers.get("retry-after")
    raise TokenbridgeError(response.status_code, body.get("code", f"http_{response.status_code}"),
                           body.get("title", response.reason_phrase), body.get("detail", response.text),
                           float(retry) if retry and retry.isdigit() else None)


def _headers(secret: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


def _sign_body(data: bytes | None, digest: bytes | None, algorithm: str, fmt: str) -> dict[str, Any]:
    if not algorithm:
        raise ValueError("name the algorithm, e.g. 'rsa-pkcs1v15-sha256' (there is no default)")
    body: dict[str, Any] = {"algorithm": algorithm, "format": fmt}
    if data is not None:
        body["data"] = base64.b64encode(data).decode()
    if digest is not None:
        body["digest"] = base64.b64encode(digest).decode()
    return body


class Client:
    """Synchronous client."""

    def __init__(self, base_url: str = "http://127.0.0.1:8155", secret: str | None = None, *,
                 uds: str | None = None, timeout: float = 60.0, verify: bool | str = True) -> None:
        transport = httpx.HTTPTransport(uds=uds) if uds else None
        self._http = httpx.Client(base_url="http://tokenbridge" if uds else base_url,
                                  headers=_headers(secret), timeout=timeout, transport=transport, verify=verify)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        response = self._http.request(method, path, **kw)
        _raise_for_problem(response)
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def tokens(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/tokens")

    def keys(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/keys")

    def key(self, key: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/keys/{key}")

    def certificate(self, key: str, format: Literal["pem", "der"] = "pem") -> bytes:
        response = self._http.get(f"/v1/keys/{key}/certificate", params={"format": format})
        _raise_for_problem(response)
        return response.content

    def chain(self, key: str) -> bytes:
        response = self._http.get(f"/v1/keys/{key}/chain")
        _raise_for_problem(response)
        return response.content

    def sign(self, key: str, data: bytes | None = None, algorithm: str = "", *, digest: bytes | None = None,
             format: Literal["der", "raw"] = "der") -> bytes:
        result = self._json("POST", f"/v1/keys/{key}/sign", json=_sign_body(data, digest, algorithm, format))
        return base64.b64decode(result["signature"])

    def decrypt(self, key: str, ciphertext: bytes, algorithm: str = "rsa-oaep-sha256") -> bytes:
        result = self._json("POST", f"/v1/keys/{key}/decrypt",
                            json={"algorithm": algorithm, "ciphertext": base64.b64encode(ciphertext).decode()})
        return base64.b64decode(result["plaintext"])

    def renewal(self) -> dict[str, Any]:
        return self._json("GET", "/v1/admin/renewal")

    def login(self, pin: str | None = None, *, accept_new_token: bool = False,
              final_try: bool = False, token: str | None = None) -> dict[str, Any]:
        """Operator only, over the admin socket. ``token``: its name, when the service has several."""
        body: dict[str, Any] = {"pin": pin, "accept_new_token": accept_new_token, "final_try": final_try}
        if token is not None:
            body["token"] = token
        return self._json("POST", "/v1/admin/login", json=body)

    def _raw(self, path: str, content: bytes, params: Any = None, accept: str = "application/octet-stream",
             content_type: str = "application/octet-stream") -> bytes:
        response = self._http.post(path, content=content, params=params,
                                   headers={"accept": accept, "content-type": content_type})
        _raise_for_problem(response)
        return response.content

    def cms_sign(self, data: bytes, key: str | None = None, *, detached: bool = True,
                 algorithm: str | None = None) -> bytes:
        """DER CMS SignedData."""
        params = {"detached": str(detached).lower(), **({"key": key} if key else {}),
                  **({"algorithm": algorithm} if algorithm else {})}
        return self._raw("/v1/cms/sign", data, params, "application/pkcs7-mime")

    def cms_encrypt(self, data: bytes, to: list[str], **options: str) -> bytes:
        """DER CMS EnvelopedData to address-book names or PEM certificates (plus the organisation)."""
        return self._raw("/v1/cms/encrypt", data, {"to": to, **options}, "application/pkcs7-mime")

    def cms_decrypt(self, data: bytes) -> bytes:
        return self._raw("/v1/cms/decrypt", data)

    def cms_verify(self, signature: bytes, content: bytes | None = None, sender: str | None = None) -> dict[str, Any]:
        body = {"signature": base64.b64encode(signature).decode(), "sender": sender,
                "content": base64.b64encode(content).decode() if content is not None else None}
        return self._json("POST", "/v1/cms/verify", json=body)

    def smime_compose(self, message: dict[str, Any]) -> bytes:
        """A ready-to-send .eml from {from, to, subject, text, attachments, sign_key, encrypt_to}."""
        response = self._http.post("/v1/smime/compose", json=message)
        _raise_for_problem(response)
        return response.content

    def smime_send(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/smime/send", json=message)

    def smime_open(self, eml: bytes) -> dict[str, Any]:
        """Decrypt and verify; JSON with the inner message (base64) and its attachments."""
        return self._json("POST", "/v1/smime/open", content=eml,
                          headers={"content-type": "message/rfc822"})


class AsyncClient:
    """Asynchronous client with the same methods."""

    def __init__(self, base_url: str = "http://127.0.0.1:8155", secret: str | None = None, *,
                 uds: str | None = None, timeout: float = 60.0, verify: bool | str = True,
                 limits: httpx.Limits | None = None) -> None:
        transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
        self._http = httpx.AsyncClient(base_url="http://tokenbridge" if uds else base_url,
                                       headers=_headers(secret), timeout=timeout, transport=transport,
                                       verify=verify, limits=limits or httpx.Limits())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        response = await self._http.request(method, path, **kw)
        _raise_for_problem(response)
        return response.json()

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/v1/health")

    async def tokens(self) -> list[dict[str, Any]]:
        return await self._json("GET", "/v1/tokens")

    async def chain(self, key: str) -> bytes:
        response = await self._http.get(f"/v1/keys/{key}/chain")
        _raise_for_problem(response)
        return response.content

    async def keys(self) -> list[dict[str, Any]]:
        return await self._json("GET", "/v1/keys")

    async def key(self, key: str) -> dict[str, Any]:
        return await self._json("GET", f"/v1/keys/{key}")

    async def certificate(self, key: str, format: Literal["pem", "der"] = "pem") -> bytes:
        response = await self._http.get(f"/v1/keys/{key}/certificate", params={"format": format})
        _raise_for_problem(response)
        return response.content

    async def sign(self, key: str, data: bytes | None = None, algorithm: str = "", *,
                   digest: bytes | None = None, format: Literal["der", "raw"] = "der") -> bytes:
        result = await self._json("POST", f"/v1/keys/{key}/sign",
                                  json=_sign_body(data, digest, algorithm, format))
        return base64.b64decode(result["signature"])

    async def decrypt(self, key: str, ciphertext: bytes, algorithm: str = "rsa-oaep-sha256") -> bytes:
        result = await self._json("POST", f"/v1/keys/{key}/decrypt", json={
            "algorithm": algorithm, "ciphertext": base64.b64encode(ciphertext).decode()})
        return base64.b64decode(result["plaintext"])

    async def smime_send(self, message: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/v1/smime/send", json=message)

    async def smime_open(self, eml: bytes) -> dict[str, Any]:
        return await self._json("POST", "/v1/smime/open", content=eml,
                                headers={"content-type": "message/rfc822"})

    async def cms_decrypt(self, data: bytes) -> bytes:
        response = await self._http.post("/v1/cms/decrypt", content=data,
                                         headers={"accept": "application/octet-stream"})
        _raise_for_problem(response)
        return response.content
