"""How the workspace writes numbers, money, shares and moments for people. Templates format
with these filters; they never compute."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from markupsafe import Markup, escape

_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "JPY": "¥", "CHF": "CHF "}
DASH = "\u2013"  # an en dash: "no value"


def number(value: int | float | Decimal | None, digits: int = 0) -> str:
    """``1234567`` -> ``1,234,567``; None -> a dash."""
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def money(value: int | float | Decimal | None, currency: str = "EUR", digits: int = 0) -> str:
    """``1234567.8, "EUR"`` -> ``€1,234,568``; a negative amount keeps its sign in front."""
    if value is None:
        return DASH
    symbol = _SYMBOLS.get(currency, f"{currency} ")
    sign = "-" if value < 0 else ""
    return f"{sign}{symbol}{abs(value):,.{digits}f}"


def percent(value: float | None, digits: int = 0) -> str:
    """A share (0.4213) as ``42%``; None -> a dash."""
    if value is None:
        return DASH
    return f"{100 * value:.{digits}f}%"


def moment(value: datetime | date | None, style: str = "datetime") -> Markup:
    """A ``<time>`` element: UTC in the page, rewritten into the browser's time zone by
    ``app.js`` (``style`` is ``datetime`` or ``date``)."""
    if value is None:
        return Markup("&ndash;")
    if isinstance(value, datetime):
        iso = value.isoformat()
        text = value.strftime("%Y-%m-%d %H:%M UTC" if style == "datetime" else "%Y-%m-%d")
    else:
        iso = text = value.isoformat()
    return Markup('<time datetime="{}" data-local="{}">{}</time>').format(
        escape(iso), escape(style), escape(text)
    )


def label(value: object) -> str:
    """An enum value or code as words: ``call_center`` -> ``call center``."""
    if value is None:
        return DASH
    raw = getattr(value, "value", value)
    return str(raw).replace("_", " ")
