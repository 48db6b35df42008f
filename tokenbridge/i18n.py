"""French for the problems counter staff see (issue 17): chosen by ``Accept-Language``, codes unchanged.

A counter's software shows a problem's ``detail`` to the person at the desk, who reads French. For the
problems that reach them in daily work, ``detail`` is then a French sentence that says what happened and
what to do; the English one stays in ``detail_en`` for the administrator and the logs, and ``code`` never
changes. Other problems (a request the software built wrong) stay in English: they are for its developers.
"""

from __future__ import annotations

import datetime
from typing import Any

_CALL_ADMIN = "si cela dure, prévenez l'administrateur"

_TOKEN_STATES = {
    "absent": "La carte de l'organisme est absente ou ne répond pas (retirée du lecteur ?). Le service la "
              f"reprend seul dès qu'elle revient : réessayez dans quelques minutes ; {_CALL_ADMIN}.",
    "needs_pin": "La carte de l'organisme attend son code PIN : l'administrateur doit le donner "
                 "(`tokenbridge login`). Prévenez-le.",
    "locked": "Le code PIN de la carte est bloqué ou à son dernier essai : le service ne l'essaie plus. "
              "Prévenez l'administrateur.",
    "foreign": "Une autre carte a été insérée à la place de celle de l'organisme : l'administrateur doit "
               "remettre la bonne, ou accepter la nouvelle. Prévenez-le.",
    "starting": "La carte est en cours d'ouverture : réessayez dans quelques secondes.",
}
_TOKEN_OTHER = "La carte de l'organisme ou son pilote ne peut pas être utilisé. Prévenez l'administrateur."


def prefers_french(accept_language: str | None) -> bool:
    """Whether French ranks above English in an ``Accept-Language`` header (RFC 9110 12.5.4); English when
    neither is named, or on a tie."""
    if not accept_language:
        return False
    best: dict[str, float] = {}
    for item in accept_language.split(",")[:32]:
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        if primary not in ("fr", "en", "*"):
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = max(0.0, min(1.0, float(value)))
                except ValueError:
                    q = 0.0
        best[primary] = max(best.get(primary, 0.0), q)
    english = best.get("en", best.get("*", 0.0))  # "*" stands for English when English is not named
    return best.get("fr", 0.0) > english


def _date(value: Any) -> str | None:
    try:
        return datetime.datetime.fromisoformat(str(value)).strftime("%d/%m/%Y")
    except ValueError:
        return None


def french_detail(code: str, extra: dict[str, Any], headers: dict[str, str] | None = None) -> str | None:
    """The French ``detail`` for a problem a counter sees, or None to keep the English one."""
    if code == "token_unavailable":
        text = _TOKEN_STATES.get(str(extra.get("state")), _TOKEN_OTHER)
        token = extra.get("token")
        return f"Carte « {token} » : {text[0].lower()}{text[1:]}" if token and token != "main" else text
    if code == "hub_unreachable":
        return ("Ce poste ne joint pas le serveur de la carte (tokenbridge) : vérifiez le réseau, puis "
                f"réessayez ; {_CALL_ADMIN}.")
    if code == "queue_full":
        wait = (headers or {}).get("Retry-After")
        when = f"dans {wait} secondes" if wait and wait != "1" else "dans un instant"
        return f"La carte est très sollicitée : trop de demandes attendent déjà. Réessayez {when}."
    if code == "deadline_exceeded":
        return ("La carte n'a pas répondu à temps (elle est lente ou très sollicitée). Réessayez ; "
                f"{_CALL_ADMIN}.")
    if code == "certificate_expired":
        if extra.get("validity") == "not_yet_valid":
            start = _date(extra.get("not_before"))
            return ("Le certificat de l'organisme sur la carte n'est pas encore valide"
                    + (f" (il le sera le {start})" if start else "") + " : il ne peut pas encore signer. "
                    "Vérifiez la date de l'ordinateur, ou prévenez l'administrateur.")
        end = _date(extra.get("not_after"))
        return ("Le certificat de l'organisme sur la carte a expiré" + (f" le {end}" if end else "")
                + " : il ne peut plus signer. Il doit être renouvelé : prévenez l'administrateur.")
    return None


def localise(code: str, detail: str, extra: dict[str, Any], headers: dict[str, str] | None,
             accept_language: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """``detail``, ``extra`` and headers for the response: French for the caller who prefers it."""
    if not prefers_french(accept_language):
        return detail, extra, headers or {}
    french = french_detail(code, extra, headers)
    if french is None:
        return detail, extra, headers or {}
    return french, {**extra, "detail_en": detail}, {**(headers or {}), "Content-Language": "fr"}
