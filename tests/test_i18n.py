"""French details for the problems counter staff meet (tokenbridge/i18n.py): who gets them, and what they say.

The services that send them are tested where each problem really happens (a card that needs its PIN, an
expired certificate, a full queue, an unreachable hub); these are the rules alone.
"""

from __future__ import annotations

import pytest

from tokenbridge.i18n import localise, prefers_french


@pytest.mark.parametrize(("header", "french"), [
    ("fr", True), ("fr-FR,fr;q=0.9,en-US;q=0.8,en;q=0.7", True), ("de, fr;q=0.1", True),
    ("en, fr;q=0.8", False), ("*", False), ("fr;q=0.5, *;q=0.9", False), ("", False), (None, False),
    ("fr;q=abc", False), ("en;q=0, fr;q=0.1", True), ("fr;q=0.8, en;q=0.8", False),
])
def test_french_when_it_ranks_above_english(header: str | None, french: bool) -> None:
    assert prefers_french(header) is french


def test_each_counter_problem_has_its_french_sentence_and_keeps_its_code() -> None:
    cases = {
        ("token_unavailable", "absent"): "absente ou ne répond pas",
        ("token_unavailable", "needs_pin"): "attend son code PIN",
        ("token_unavailable", "locked"): "bloqué",
        ("token_unavailable", "foreign"): "Une autre carte",
        ("token_unavailable", "error"): "ne peut pas être utilisé",
        ("deadline_exceeded", None): "n'a pas répondu à temps",
        ("hub_unreachable", None): "ne joint pas le serveur",
    }
    for (code, state), words in cases.items():
        detail, extra, headers = localise(code, "english", {"state": state} if state else {}, None, "fr")
        assert words in detail and extra["detail_en"] == "english" and headers["Content-Language"] == "fr", code
    detail, _, _ = localise("queue_full", "full", {}, {"Retry-After": "3"}, "fr")
    assert "Réessayez dans 3 secondes" in detail
    detail, _, _ = localise("certificate_expired", "x", {"validity": "not_yet_valid",
                                                         "not_before": "2027-01-15T00:00:00+00:00"}, None, "fr")
    assert "pas encore valide (il le sera le 15/01/2027)" in detail
    detail, _, _ = localise("token_unavailable", "x", {"state": "absent", "token": "hlm-b"}, None, "fr")
    assert detail.startswith("Carte « hlm-b » : la carte de l'organisme est absente")


def test_english_and_developer_problems_stay_as_they_are() -> None:
    assert localise("token_unavailable", "english", {"state": "absent"}, None, "en-GB") == \
        ("english", {"state": "absent"}, {})
    assert localise("invalid_request", "english", {}, None, "fr") == ("english", {}, {})
