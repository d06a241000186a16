"""The XLM-R language list and the weights used to sample a language per example.

The E5-mistral data covers the ~93 languages of XLM-R, weighted toward high-resource
languages (English was 43% of it). The tiers below follow the size of each language's
CC-100 corpus: "high" holds the largest ~25, "mid" the next ~30, "low" the rest.
"""

from __future__ import annotations

import random

# (ISO code, English name, tier)
XLMR_LANGUAGES: tuple[tuple[str, str, str], ...] = (
    ("en", "English", "high"), ("ru", "Russian", "high"), ("id", "Indonesian", "high"),
    ("vi", "Vietnamese", "high"), ("fa", "Persian", "high"), ("uk", "Ukrainian", "high"),
    ("sv", "Swedish", "high"), ("th", "Thai", "high"), ("ja", "Japanese", "high"),
    ("de", "German", "high"), ("ro", "Romanian", "high"), ("hu", "Hungarian", "high"),
    ("bg", "Bulgarian", "high"), ("fr", "French", "high"), ("fi", "Finnish", "high"),
    ("ko", "Korean", "high"), ("es", "Spanish", "high"), ("pt", "Portuguese", "high"),
    ("el", "Greek", "high"), ("no", "Norwegian", "high"), ("da", "Danish", "high"),
    ("pl", "Polish", "high"), ("it", "Italian", "high"), ("nl", "Dutch", "high"),
    ("zh", "Chinese", "high"), ("ar", "Arabic", "high"), ("tr", "Turkish", "high"),
    ("cs", "Czech", "mid"), ("he", "Hebrew", "mid"), ("hi", "Hindi", "mid"),
    ("sk", "Slovak", "mid"), ("lt", "Lithuanian", "mid"), ("hr", "Croatian", "mid"),
    ("ca", "Catalan", "mid"), ("sl", "Slovenian", "mid"), ("sr", "Serbian", "mid"),
    ("et", "Estonian", "mid"), ("lv", "Latvian", "mid"), ("bn", "Bengali", "mid"),
    ("ta", "Tamil", "mid"), ("ms", "Malay", "mid"), ("ur", "Urdu", "mid"),
    ("ka", "Georgian", "mid"), ("ml", "Malayalam", "mid"), ("az", "Azerbaijani", "mid"),
    ("sq", "Albanian", "mid"), ("mk", "Macedonian", "mid"), ("kk", "Kazakh", "mid"),
    ("te", "Telugu", "mid"), ("hy", "Armenian", "mid"), ("mn", "Mongolian", "mid"),
    ("bs", "Bosnian", "mid"), ("be", "Belarusian", "mid"), ("is", "Icelandic", "mid"),
    ("tl", "Tagalog", "mid"), ("mr", "Marathi", "mid"), ("kn", "Kannada", "mid"),
    ("ne", "Nepali", "low"), ("gl", "Galician", "low"), ("si", "Sinhala", "low"),
    ("eu", "Basque", "low"), ("gu", "Gujarati", "low"), ("af", "Afrikaans", "low"),
    ("uz", "Uzbek", "low"), ("km", "Khmer", "low"), ("la", "Latin", "low"),
    ("eo", "Esperanto", "low"), ("ky", "Kyrgyz", "low"), ("pa", "Punjabi", "low"),
    ("my", "Burmese", "low"), ("sw", "Swahili", "low"), ("cy", "Welsh", "low"),
    ("am", "Amharic", "low"), ("ps", "Pashto", "low"), ("or", "Odia", "low"),
    ("ku", "Kurdish", "low"), ("so", "Somali", "low"), ("ga", "Irish", "low"),
    ("lo", "Lao", "low"), ("sa", "Sanskrit", "low"), ("jv", "Javanese", "low"),
    ("mg", "Malagasy", "low"), ("sd", "Sindhi", "low"), ("ug", "Uyghur", "low"),
    ("as", "Assamese", "low"), ("fy", "Western Frisian", "low"), ("gd", "Scottish Gaelic", "low"),
    ("br", "Breton", "low"), ("ha", "Hausa", "low"), ("om", "Oromo", "low"),
    ("su", "Sundanese", "low"), ("xh", "Xhosa", "low"), ("yi", "Yiddish", "low"),
)
NAMES = {code: name for code, name, _ in XLMR_LANGUAGES}
TIERS = {code: tier for code, _, tier in XLMR_LANGUAGES}
# Scripts written without spaces between words: word counts fall back to characters.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "km", "lo", "my"})


def language_weights(
    english_share: float = 0.43,
    tier_weights: dict[str, float] | None = None,
    overrides: dict[str, float] | None = None,
    restrict: list[str] | None = None,
) -> dict[str, float]:
    """Normalised sampling weights by ISO code.

    English gets ``english_share``; the rest is split over the other languages in proportion
    to their tier weight, then ``overrides`` replace single languages' relative weights.
    """
    tier_weights = {"high": 1.0, "mid": 0.25, "low": 0.05, **(tier_weights or {})}
    overrides = overrides or {}
    unknown = [c for c in list(overrides) + list(restrict or []) if c not in NAMES]
    if unknown:
        raise ValueError(
            f"Unknown language code(s) {unknown}; use ISO codes from the XLM-R list, e.g. en, de, zh."
        )
    codes = [c for c, _, _ in XLMR_LANGUAGES if not restrict or c in restrict]
    rel = {c: float(overrides.get(c, tier_weights[TIERS[c]])) for c in codes if c != "en"}
    rel = {c: w for c, w in rel.items() if w > 0}
    total = sum(rel.values())
    out: dict[str, float] = {}
    has_en = "en" in codes and overrides.get("en", 1.0) > 0
    en = english_share if has_en else 0.0
    if not rel:
        en = 1.0 if has_en else 0.0
    if has_en:
        out["en"] = en
    for c, w in rel.items():
        out[c] = (1.0 - en) * w / total
    if not out or sum(out.values()) <= 0:
        raise ValueError("Language weights leave no language to sample; keep at least one weight above 0.")
    return out


class LanguageSampler:
    """Draws ISO codes from fixed weights with a caller-supplied RNG (so sampling is seeded)."""

    def __init__(self, weights: dict[str, float]):
        self.codes = list(weights)
        self.weights = [weights[c] for c in self.codes]

    def sample(self, rng: random.Random) -> str:
        return rng.choices(self.codes, weights=self.weights, k=1)[0]

    def sample_pair(self, rng: random.Random) -> tuple[str, str]:
        """Two different languages (bitext); the second from the same weights."""
        src = self.sample(rng)
        if len(self.codes) == 1:
            other = [c for c in NAMES if c != src]
            return src, rng.choice(other)
        while True:
            tgt = self.sample(rng)
            if tgt != src:
                return src, tgt
