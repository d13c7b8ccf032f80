"""The synthetic portfolio behind ``kam demo``.

A demo is only convincing if the scorer has something real-looking to chew on: a heavy tail of
account sizes (a fifth of the accounts bring most of the profit), margins that differ by account,
late payers, contacts and interactions, accounts that slowly stop buying and a few that grow
fast. The portfolio is sent through ``POST /v1/events`` like any producer's data, never written
into tables, so a demo also exercises validation, idempotency and the scorer's triggers.

Orders do not follow the retention model's own process (BG/NBD: Poisson buying while alive, a
drop-out chance after each order), so the demo shows the model on data it did not generate:

- each account has a rhythm, quasi-regular (monthly replenishment, give or take a week) or
  irregular, sped up in busy months (a summer dip, a year-end peak) and by its trend;
- a buying occasion is often a burst: a few smaller follow-up orders within six days;
- now and then an account slows down for a few months (a budget freeze) and recovers, and some
  pause for four to nine months and then come back;
- accounts leave in calendar time, by a Weibull hazard in their age (young accounts leave more
  often), raised during a slowdown and for three months after it; most fade first (their gaps
  lengthen over months), some stop abruptly.

Everything is drawn from one ``random.Random(seed)`` relative to ``now``: the same seed gives the
same event ids, so running the demo twice only yields duplicates.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as day_time
from itertools import accumulate
from typing import Any

import httpx

CURRENCY = "EUR"
MAX_BATCH_EVENTS = 1000  # the server's default limit per batch
MAX_BATCH_BYTES = 900 * 1024  # under the 1 MiB body limit, with room for the envelope
MAX_REPORTED_ERRORS = 10
RETRIES_WHEN_UNAVAILABLE = 3


@dataclass(frozen=True, slots=True)
class _Category:
    name: str
    unit_price: float
    fractional: bool  # sold by litre or hour rather than by piece


CATEGORIES: tuple[_Category, ...] = (
    _Category("spare parts", 85.0, False),
    _Category("hydraulics", 420.0, False),
    _Category("pneumatics", 160.0, False),
    _Category("bearings", 35.0, False),
    _Category("fasteners", 0.9, False),
    _Category("electrical components", 55.0, False),
    _Category("sensors", 140.0, False),
    _Category("tools", 70.0, False),
    _Category("safety equipment", 45.0, False),
    _Category("lubricants", 6.5, True),
    _Category("packaging materials", 1.8, False),
    _Category("services", 95.0, True),
)

# Relative order activity by month: busy before year end, quiet in the August holidays.
_SEASON = (0.92, 0.97, 1.06, 1.0, 1.0, 0.96, 0.86, 0.55, 1.05, 1.1, 1.22, 1.31)

_INDUSTRIES = (
    "Machinery",
    "Automotive",
    "Chemicals",
    "Food & Beverage",
    "Construction",
    "Healthcare",
    "Retail",
    "Electronics",
    "Logistics",
    "Energy",
    "Packaging",
    "Pharma",
)
_INDUSTRY_WORD = {
    "Machinery": "Maschinenbau",
    "Automotive": "Automotive",
    "Chemicals": "Chemie",
    "Food & Beverage": "Foods",
    "Construction": "Bau",
    "Healthcare": "Medical",
    "Retail": "Handel",
    "Electronics": "Elektronik",
    "Logistics": "Logistik",
    "Energy": "Energie",
    "Packaging": "Verpackung",
    "Pharma": "Pharma",
}
# region: (weight, legal forms, phone prefix)
_REGIONS: dict[str, tuple[float, tuple[str, ...], str]] = {
    "DACH": (0.34, ("GmbH", "AG", "GmbH & Co. KG"), "+49"),
    "Benelux": (0.12, ("B.V.", "N.V."), "+31"),
    "France": (0.12, ("SAS", "SA"), "+33"),
    "UK & Ireland": (0.1, ("Ltd", "PLC"), "+44"),
    "Nordics": (0.1, ("AB", "AS", "Oy"), "+46"),
    "Italy": (0.08, ("S.p.A.", "S.r.l."), "+39"),
    "Iberia": (0.06, ("S.A.", "S.L."), "+34"),
    "CEE": (0.08, ("sp. z o.o.", "s.r.o."), "+48"),
}
_REGION_NAMES = tuple(_REGIONS)
_REGION_WEIGHTS = tuple(w for w, _, _ in _REGIONS.values())
_STEM_HEADS = (
    "Nord", "Rhein", "Alpen", "Hansa", "Delta", "Vektor", "Ostra", "Lumen", "Falk", "Brenner",
    "Kessler", "Atlas", "Orion", "Polar", "Terra", "Nova", "Astra", "Baltic", "Iber", "Celt",
    "Vista", "Linde", "Stein", "Berg", "Adler", "Merkur", "Helio", "Krona", "Sigma", "Quanta",
)  # fmt: skip
_STEM_TAILS = (
    "werk", "tec", "tronic", "plan", "form", "mat", "bau", "chem", "log", "pack", "med", "flex",
    "line", "star",
)  # fmt: skip
_FEMALE = (
    "Anna", "Lena", "Marie", "Sophie", "Julia", "Laura", "Emma", "Clara", "Sara", "Ingrid",
    "Claire", "Elena", "Giulia", "Lucia", "Agnieszka", "Katarzyna", "Eva", "Hanna", "Olivia",
    "Charlotte",
)  # fmt: skip
_MALE = (
    "Lukas", "Jonas", "Felix", "Paul", "Thomas", "Michael", "Stefan", "Jan", "Pieter", "Lars",
    "Erik", "Pierre", "Louis", "Marco", "Luca", "Javier", "Pablo", "Tomasz", "James", "Oliver",
)  # fmt: skip
_LAST = (
    "Muller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Hoffmann",
    "Koch", "de Vries", "Janssen", "Bakker", "Martin", "Bernard", "Dubois", "Smith", "Jones",
    "Taylor", "Andersson", "Johansson", "Nielsen", "Rossi", "Russo", "Bianchi", "Garcia",
    "Fernandez", "Lopez", "Nowak", "Kowalski", "Novak", "Horvath", "Berger", "Huber", "Wolf",
    "Lange", "Krause", "Peeters", "Lindqvist", "Moreau",
)  # fmt: skip

_CHURN_REASONS = (
    "Moved its volume to a competitor with lower prices.",
    "Purchasing consolidated at group level with another supplier.",
    "Repeated delivery delays; the customer lost confidence.",
    "Insolvency proceedings opened.",
    "Our product range no longer fits their production.",
    "Acquired by a competitor who buys centrally.",
)
_CONVERSATIONS = (
    "Quarterly business review",
    "Follow-up on quote",
    "Price negotiation for next year",
    "Introduced new product line",
    "Clarified delivery schedule",
    "Discussed framework agreement",
    "Technical consultation",
    "Checked on open order",
)
_COMPLAINTS = (
    "Delivery arrived late",
    "Wrong items delivered",
    "Quality issue with last shipment",
    "Invoice dispute",
    "Damaged packaging",
    "Slow response from support",
)
_COMMUNICATION_CHANNELS = ("email", "phone", "visit", "meeting", "seminar", "web", "call_center")
_COMMUNICATION_CUM = tuple(accumulate((0.35, 0.3, 0.1, 0.12, 0.05, 0.05, 0.03)))
_LINE_COUNT_CUM = (0.35, 0.65, 0.85, 1.0)  # 1 to 4 lines an order

# Satisfaction 1..5 of a content customer and of one that is drifting away.
_CONTENT = (0.02, 0.05, 0.15, 0.43, 0.35)
_UNHAPPY = (0.25, 0.35, 0.25, 0.1, 0.05)


# --- generation -----------------------------------------------------------------------------


class _Clock:
    """Days as floats from midnight (UTC) of the window's first day, with precomputed calendar
    lookups, because formatting ~100k timestamps through datetime is the slow part."""

    def __init__(self, now: datetime, years: float) -> None:
        self.window_days = years * 365.25
        start = now - timedelta(days=self.window_days)
        self.day0 = datetime.combine(start.date(), day_time(), tzinfo=UTC)
        self.now = (now - self.day0) / timedelta(days=1)
        self.start = self.now - self.window_days
        # enough days for due dates and payment terms beyond now
        days = int(self.now) + 500
        dates = [self.day0 + timedelta(days=d) for d in range(days)]
        self.dates = [d.strftime("%Y-%m-%d") for d in dates]
        self.weekday = [d.weekday() for d in dates]
        self.season = [_SEASON[d.month - 1] for d in dates]

    def stamp(self, t: float) -> str:
        day = int(t)
        seconds = int((t - day) * 86_400)
        hh, rest = divmod(seconds, 3600)
        return f"{self.dates[day]}T{hh:02d}:{rest // 60:02d}:{rest % 60:02d}Z"

    def business_time(self, t: float, rng: random.Random) -> float:
        """The same day (or the Monday after a weekend) during office hours."""
        day = int(t)
        weekday = self.weekday[day]
        if weekday >= 5:
            day += 7 - weekday
        return day + rng.uniform(7.5, 17.5) / 24


@dataclass(slots=True)
class _Account:
    index: int
    external_id: str
    size: float
    stem: str = ""
    name: str = ""
    industry: str = ""
    region: str = ""
    segment: str = "SMB"
    strategic_fit: int = 3
    terms: int = 30
    margin: float = 0.27
    orders_per_month: float = 1.0
    regularity: float = 2.0  # gamma shape of the gap between orders: higher is more regular
    order_mu: float = 7.0  # log of the typical order value
    categories: list[int] = field(default_factory=list)
    category_cum_weights: list[float] = field(default_factory=list)
    payer: str = "on_time"
    lateness: float = 0.0  # mean days late, for late payers
    start: float = 0.0
    stop: float = math.inf  # churners stop ordering here
    decay_start: float = math.inf
    abrupt: bool = False  # a churner whose orders stop without fading first
    growth: float = 0.0  # log growth of activity per year
    burst: float = 0.1  # chance of one more follow-up order in an occasion
    slowdowns: list[tuple[float, float, float]] = field(default_factory=list)  # start, end, pace
    pauses: list[tuple[float, float]] = field(default_factory=list)  # no orders in [start, end)
    lost: bool = False
    parent: _Account | None = None
    manager: str | None = None
    contacts: list[tuple[str, str]] = field(default_factory=list)  # (external id, role)
    happiness: tuple[float, ...] = _CONTENT

    @property
    def churning(self) -> bool:
        return self.stop < math.inf

    def activity(self, t: float, now: float) -> float:
        """Multiplier of the order rate at ``t``: the account's trend, a temporary slowdown, and
        for a churner the fade that ends in silence."""
        if t >= self.stop:
            return 0.0
        level = math.exp(self.growth * (t - now) / 365.25)
        for start, end, pace in self.slowdowns:
            if start <= t < end:
                level *= pace
        if t > self.decay_start and not self.abrupt:
            level *= 1.0 - 0.85 * (t - self.decay_start) / (self.stop - self.decay_start)
        return level


def _cents(value: int) -> str:
    return f"{value // 100}.{value % 100:02d}"


def _person(rng: random.Random) -> tuple[str, str, str]:
    """(first name, last name, gender)."""
    if rng.random() < 0.45:
        return rng.choice(_FEMALE), rng.choice(_LAST), "female"
    return rng.choice(_MALE), rng.choice(_LAST), "male"


def _slug(text: str) -> str:
    return "".join(c for c in text.lower().replace(" ", ".") if c.isalnum() or c in ".-")


def _phone(rng: random.Random, region: str) -> str:
    prefix = _REGIONS[region][2]
    return f"{prefix} {rng.randint(20, 899)} {rng.randint(100_000, 9_999_999)}"


def _managers(rng: random.Random, count: int, seed: int) -> list[dict[str, Any]]:
    events = []
    for i in range(1, count + 1):
        first, last, _ = _person(rng)
        external_id = f"MGR-{i:03d}"
        events.append(
            {
                "type": "manager",
                "event_id": f"demo-{seed}-manager-{external_id}-v1",
                "version": 1,
                "external_id": external_id,
                "name": f"{first} {last}",
                "email": f"{_slug(first)}.{_slug(last)}@kam.example",
                "capacity": rng.choices((9, 7, 12), weights=(0.7, 0.15, 0.15))[0],
            }
        )
    return events


def _profiles(rng: random.Random, count: int, clock: _Clock) -> list[_Account]:
    """Draw every account's character: size, margin, rhythm, and whether it churns or grows."""
    # Pareto with alpha ~1.1 is the textbook 80/20; capped so one account cannot be the demo.
    accounts = [
        _Account(index=i, external_id=f"ACC-{i:05d}", size=min(rng.paretovariate(1.0), 2000.0))
        for i in range(1, count + 1)
    ]
    ranked = sorted(accounts, key=lambda a: a.size, reverse=True)
    rank = {a.index: r / max(1, count - 1) for r, a in enumerate(ranked)}  # 0 = largest
    names: set[str] = set()
    for a in accounts:
        top = rank[a.index]
        a.segment = "Enterprise" if top < 0.1 else "Mid-Market" if top < 0.4 else "SMB"
        a.industry = rng.choice(_INDUSTRIES)
        a.region = rng.choices(_REGION_NAMES, weights=_REGION_WEIGHTS)[0]
        for attempt in range(10):
            a.stem = rng.choice(_STEM_HEADS) + rng.choice(_STEM_TAILS)
            legal = rng.choice(_REGIONS[a.region][1])
            name = f"{a.stem} {_INDUSTRY_WORD[a.industry]} {legal}"
            if attempt == 9:
                name = f"{a.stem} {_INDUSTRY_WORD[a.industry]} {a.index} {legal}"
            if name not in names:
                break
        names.add(name)
        a.name = name
        terms_weights = (0.1, 0.4, 0.5) if top < 0.1 else (0.3, 0.55, 0.15)
        a.terms = rng.choices((14, 30, 60), weights=terms_weights)[0]
        a.strategic_fit = rng.choices((1, 2, 3, 4, 5), weights=(0.1, 0.2, 0.35, 0.25, 0.1))[0]
        # Big accounts often buy at thin margins; a few small ones pay premium prices.
        if top < 0.25 and rng.random() < 0.3:
            a.margin = rng.uniform(0.03, 0.08)
        elif top > 0.5 and rng.random() < 0.15:
            a.margin = rng.uniform(0.38, 0.55)
        else:
            a.margin = rng.uniform(0.2, 0.35)
        # Size shows partly as more orders, partly as bigger ones.
        a.orders_per_month = min(4.0, max(0.15, rng.gammavariate(2.0, 0.4) * a.size**0.25))
        a.order_mu = math.log(1500.0) + 0.65 * math.log(a.size) + rng.gauss(0.0, 0.3)
        # Replenishment buyers keep a rhythm (gamma shape 4-10); the others barely (1-2.5).
        regular = rng.random() < 0.4
        a.regularity = rng.uniform(4.0, 10.0) if regular else rng.uniform(1.0, 2.5)
        a.burst = rng.betavariate(0.5, 6.0)
        a.categories = rng.sample(range(len(CATEGORIES)), rng.randint(3, 6))
        a.category_cum_weights = list(accumulate(rng.expovariate(1.0) for _ in a.categories))
        a.payer = rng.choices(("early", "on_time", "late"), weights=(0.15, 0.6, 0.25))[0]
        a.lateness = rng.uniform(8.0, 45.0)
        a.growth = rng.gauss(0.03, 0.12)
        a.start = clock.start
        if rng.random() < 0.12:  # won during the window
            a.start = rng.uniform(clock.start, max(clock.start, clock.now - 90))
        a.happiness = _CONTENT if rng.random() < 0.85 else (0.08, 0.17, 0.35, 0.3, 0.1)

    order = list(accounts)
    rng.shuffle(order)
    growers = order[: max(1, round(0.05 * count))]
    window = clock.window_days
    for a in growers:
        a.start = clock.now - rng.uniform(0.15, 0.55) * window
        a.growth = rng.uniform(math.log(2.5), math.log(5.0))
        a.strategic_fit = min(5, a.strategic_fit + 1)
    for a in order[len(growers) :]:
        _slowdowns_and_pauses(rng, a, clock)
        # A customer for years already, or won during the window (then new, and at risk).
        age = rng.uniform(0.3, 12.0) * 365.25 if a.start == clock.start else 0.0
        a.stop = _leaving_day(rng, a, clock, age)
        if not a.churning:
            continue
        a.growth = 0.0
        a.decay_start = min(a.stop - 1.0, max(a.start, a.stop - rng.uniform(60.0, 300.0)))
        a.abrupt = rng.random() < 0.3  # lost to a competitor overnight: orders do not fade
        if rng.random() < 0.6:
            a.payer = "late"
        a.lost = clock.now - a.stop > 90 and rng.random() < 0.45
        a.happiness = _UNHAPPY
    return accounts


_WEIBULL_SHAPE = 0.7  # below one: the hazard falls with the account's age
_LIFE_SCALE_DAYS = 9.0 * 365.25  # of an account of size one, before its frailty
_SLOWDOWN_HAZARD = 4.0  # the hazard during a slowdown and for _AFTER_SLOWDOWN days after it
_AFTER_SLOWDOWN = 90.0


def _slowdowns_and_pauses(rng: random.Random, a: _Account, clock: _Clock) -> None:
    """Temporary slowdowns (about one in six accounts a year: the rate falls to 20-50% for
    1.5-5 months) and pauses (about one in ten accounts a year: no order for 4-9 months, then
    the old rhythm again)."""
    first = max(a.start, clock.start)
    years = (clock.now - first) / 365.25
    for _ in range(2):
        if rng.random() < 0.08 * years:
            begin = rng.uniform(first, clock.now)
            a.slowdowns.append((begin, begin + rng.uniform(45.0, 150.0), rng.uniform(0.2, 0.5)))
    if rng.random() < 0.1 * years and clock.now - first > 240:
        begin = rng.uniform(first + 30.0, clock.now - 150.0)
        a.pauses.append((begin, begin + rng.uniform(120.0, 270.0)))


def _leaving_day(rng: random.Random, a: _Account, clock: _Clock, age: float) -> float:
    """The day the account stops buying (``inf`` if it is still a customer now).

    The hazard is Weibull in the account's age (``age`` days at ``a.start``), with a per-account
    frailty and longer lives for larger accounts, raised during slowdowns and after them: calendar
    time, not a coin tossed after each order as BG/NBD assumes."""
    scale = _LIFE_SCALE_DAYS * math.exp(rng.gauss(0.0, 0.6)) * a.size**0.25
    born = a.start - age

    def weibull(t: float) -> float:
        return math.pow(max(t - born, 0.0) / scale, _WEIBULL_SHAPE)

    def hazard(t: float) -> float:  # cumulative, from a.start
        total = weibull(t) - weibull(a.start)
        for begin, end, _ in a.slowdowns:
            low, high = max(begin, a.start), min(t, end + _AFTER_SLOWDOWN)
            if high > low:
                total += (_SLOWDOWN_HAZARD - 1.0) * (weibull(high) - weibull(low))
        return total

    threshold = rng.expovariate(1.0)
    if hazard(clock.now) < threshold:
        return math.inf
    low, high = a.start, clock.now
    while high - low > 0.01:
        middle = (low + high) / 2
        low, high = (middle, high) if hazard(middle) < threshold else (low, middle)
    return high


def _assign_groups(rng: random.Random, accounts: list[_Account]) -> None:
    """About 10% of accounts become subsidiaries of a larger group account (one level deep)."""
    count = len(accounts)
    subsidiaries = round(0.1 * count)
    if count < 3 or subsidiaries == 0:
        return
    order = list(accounts)
    rng.shuffle(order)
    children = order[:subsidiaries]
    others = order[subsidiaries:]
    groups = max(1, round(subsidiaries / 2.5))
    parents = sorted(others, key=lambda a: a.size, reverse=True)[: groups * 3]
    parents = rng.sample(parents, min(groups, len(parents)))
    for child in children:
        parent = rng.choice(parents)
        child.parent = parent
        child.industry = parent.industry
        child.stem = parent.stem
        legal = rng.choice(_REGIONS[child.region][1])
        child.name = (
            f"{parent.stem} {_INDUSTRY_WORD[parent.industry]} {child.region} {child.index} {legal}"
        )


def _assign_managers(rng: random.Random, accounts: list[_Account], managers: int) -> None:
    """Most accounts have a manager, the larger ones nearly always; a group keeps one."""
    ids = [f"MGR-{i:03d}" for i in range(1, managers + 1)]
    load = dict.fromkeys(ids, 0)
    for a in sorted(accounts, key=lambda a: a.size, reverse=True):
        if a.parent is not None:
            continue
        if rng.random() < (0.97 if a.segment != "SMB" else 0.8):
            chosen = min(ids, key=lambda m: (load[m], rng.random()))
            a.manager = chosen
            load[chosen] += 1
    for a in accounts:
        if a.parent is not None:
            a.manager = a.parent.manager if rng.random() < 0.8 else rng.choice(ids)


def _account_event(a: _Account, seed: int, *, version: int = 1) -> dict[str, Any]:
    monthly = a.orders_per_month * math.exp(a.order_mu + 0.15)
    credit = max(5000, math.ceil(monthly * max(1.0, a.terms / 30) * 1.5 / 1000) * 1000)
    event: dict[str, Any] = {
        "type": "account",
        "event_id": f"demo-{seed}-account-{a.external_id}-v{version}",
        "version": version,
        "external_id": a.external_id,
        "name": a.name,
        "industry": a.industry,
        "region": a.region,
        "segment": a.segment,
        "credit_limit": f"{credit}.00",
        "payment_terms_days": a.terms,
        "strategic_fit": a.strategic_fit,
        "status": "active",
    }
    if a.parent is not None:
        event["parent_external_id"] = a.parent.external_id
    if a.manager is not None:
        event["manager_external_id"] = a.manager
    return event


def _contacts(rng: random.Random, a: _Account, seed: int) -> list[dict[str, Any]]:
    weights = (0.05, 0.25, 0.4, 0.3) if a.segment != "SMB" else (0.35, 0.35, 0.2, 0.1)
    count = rng.choices((1, 2, 3, 4), weights=weights)[0]
    roles = ["decision_maker", *rng.sample(("buyer", "influencer", "user"), count - 1)]
    domain = f"{_slug(a.stem)}-{_slug(_INDUSTRY_WORD[a.industry])}.example"
    events = []
    for k, role in enumerate(roles, start=1):
        first, last, gender = _person(rng)
        external_id = f"CON-{a.index:05d}-{k}"
        a.contacts.append((external_id, role))
        events.append(
            {
                "type": "contact",
                "event_id": f"demo-{seed}-contact-{external_id}-v1",
                "version": 1,
                "external_id": external_id,
                "account_external_id": a.external_id,
                "name": f"{first} {last}",
                "role": role,
                "email": f"{_slug(first)}.{_slug(last)}@{domain}",
                "phone": _phone(rng, a.region),
                "gender": gender,
                "birth_year": rng.randint(1960, 1999),
            }
        )
    return events


def _order_times(rng: random.Random, a: _Account, clock: _Clock) -> list[tuple[float, bool]]:
    """(time, follow-up?) of the account's orders, in time order.

    Buying occasions form a renewal process: gamma gaps around the account's usual gap,
    shortened in busy months and stretched by its trend, a slowdown or a churner's fade, so a
    regular buyer keeps its rhythm and a fading one's gaps lengthen until it stops. A pause
    freezes the rhythm; it picks up where it was. An occasion is often a burst: follow-up
    orders within six days of its first."""
    mean_gap = 30.0 / a.orders_per_month
    shape = a.regularity
    # Every account the demo sends ordered at least once before it left.
    t = a.start + rng.uniform(0.0, min(mean_gap, a.stop - a.start))
    orders: list[tuple[float, bool]] = []
    while t < clock.now:
        level = a.activity(t, clock.now)
        if level <= 0.0:
            break
        orders.append((clock.business_time(t, rng), False))
        follow_ups = 0
        while follow_ups < 4 and rng.random() < a.burst:
            follow_ups += 1
            orders.append((clock.business_time(t + rng.uniform(0.0, 6.0), rng), True))
        pace = max(clock.season[int(t)] * level, 0.05)
        following = t + rng.gammavariate(shape, mean_gap / shape) / pace
        for begin, end in a.pauses:
            if t < begin <= following:
                following += end - begin
        t = following
    return sorted(order for order in orders if order[0] < clock.now)


def _lines(rng: random.Random, a: _Account, amount: int) -> list[dict[str, str]]:
    count = min(len(a.categories), rng.choices((1, 2, 3, 4), cum_weights=_LINE_COUNT_CUM)[0])
    # The account's favourite categories, distinct; a rare short draw is topped up at random.
    draws = rng.choices(a.categories, cum_weights=a.category_cum_weights, k=3 * count)
    picked = list(dict.fromkeys(draws))[:count]
    if len(picked) < count:
        picked += rng.sample([c for c in a.categories if c not in picked], count - len(picked))
    shares = [rng.expovariate(1.0) + 0.05 for _ in picked]
    total = sum(shares)
    lines = []
    left = amount
    for i, c in enumerate(picked):
        part = left if i == count - 1 else int(amount * shares[i] / total)
        left -= part
        category = CATEGORIES[c]
        units = part / 100 / (category.unit_price * rng.uniform(0.8, 1.25))
        quantity = f"{max(units, 0.5):.3f}" if category.fractional else str(max(1, round(units)))
        lines.append({"category": category.name, "quantity": quantity, "amount": _cents(part)})
    return lines


def _paid_at(rng: random.Random, a: _Account, ordered: float, due: float, t: float) -> float:
    if a.payer == "early":
        return ordered + rng.uniform(2.0, min(10.0, a.terms))
    late = a.payer == "late" or rng.random() < 0.08
    if a.churning and t > a.decay_start:
        late = late or rng.random() < 0.5
    if late:
        mean = a.lateness if a.payer == "late" else 6.0
        return due + rng.gammavariate(2.0, mean / 2.0)
    return max(ordered + 1.0, due - rng.uniform(0.0, 5.0))


def _orders_and_payments(
    rng: random.Random, a: _Account, clock: _Clock, seed: int
) -> list[tuple[float, dict[str, Any]]]:
    out: list[tuple[float, dict[str, Any]]] = []
    times = _order_times(rng, a, clock)
    last = len(times) - 1
    for k, (t, follow_up) in enumerate(times, start=1):
        external_id = f"SO-{a.index:05d}-{k:04d}"
        value = math.exp(rng.gauss(a.order_mu, 0.55))
        if follow_up:  # a forgotten item or a split delivery: smaller than the main order
            value *= 0.35 * math.exp(rng.gauss(0.0, 0.4))
        amount = max(1500, round(value * 100))
        margin = min(0.7, max(0.005, rng.gauss(a.margin, 0.03)))
        draw = rng.random()
        status = "placed" if draw < 0.955 else "cancelled" if draw < 0.98 else "returned"
        stamp = clock.stamp(t)
        out.append(
            (
                t,
                {
                    "type": "order",
                    "event_id": f"demo-{seed}-order-{external_id}-v1",
                    "version": 1,
                    "external_id": external_id,
                    "account_external_id": a.external_id,
                    "ordered_at": stamp,
                    "amount": _cents(amount),
                    "cost": _cents(round(amount * (1 - margin))),
                    "currency": CURRENCY,
                    "status": status,
                    "lines": _lines(rng, a, amount),
                },
            )
        )
        if status != "placed":
            continue
        due = t + a.terms
        paid = _paid_at(rng, a, t, due, t)
        if a.payer == "late" and clock.now - 60 < due < clock.now and rng.random() < 0.3:
            paid = math.inf  # overdue and still open
        if a.lost and k - 1 == last and rng.random() < 0.3:
            paid = math.inf  # a lost customer's last bill, never settled
        invoice_id = f"INV-{a.index:05d}-{k:04d}"
        payment: dict[str, Any] = {
            "type": "payment",
            "event_id": f"demo-{seed}-payment-{invoice_id}-v1",
            "version": 1,
            "invoice_external_id": invoice_id,
            "account_external_id": a.external_id,
            "amount": _cents(amount),
            "currency": CURRENCY,
            "due_at": clock.stamp(due),
        }
        if paid < clock.now:
            payment["paid_at"] = clock.stamp(paid)
        out.append((t, payment))
    return out


def _engagement(a: _Account, t: float, now: float) -> float:
    """How much contact there is at ``t``: fading with a churner, nothing long after it left."""
    if t < a.start:
        return 0.0
    if a.churning:
        if t >= a.stop:
            return 0.1 if t < a.stop + 60 else (0.0 if a.lost else 0.03)
        if t > a.decay_start:
            return 1.0 - 0.6 * (t - a.decay_start) / (a.stop - a.decay_start)
        return 1.0
    return min(1.0, math.exp(0.5 * a.growth * (t - now) / 365.25))


def _complaint_rate(a: _Account, t: float) -> float:
    """Complaints per day: rare, but frequent while a churner is drifting away."""
    if a.churning and a.decay_start - 30 < t < a.stop + 30:
        return 0.3 / 30
    return 0.015 / 30 * (1 + math.pow(a.size, 0.2))


def _interactions(
    rng: random.Random, a: _Account, clock: _Clock, seed: int
) -> list[tuple[float, dict[str, Any]]]:
    drafts: list[tuple[float, str, str, str, int | None, str]] = []
    comm_rate = min(8.0, max(0.2, rng.gammavariate(2.0, 0.4) * a.size**0.3)) / 30
    t = clock.start + rng.expovariate(comm_rate)
    while t < clock.now:
        if rng.random() < _engagement(a, t, clock.now):
            channel = rng.choices(_COMMUNICATION_CHANNELS, cum_weights=_COMMUNICATION_CUM)[0]
            direction = (
                "outbound" if channel in ("visit", "seminar") or rng.random() < 0.6 else "inbound"
            )
            summary = (
                "Product training seminar" if channel == "seminar" else rng.choice(_CONVERSATIONS)
            )
            drafts.append((t, channel, direction, "communication", None, summary))
        t += rng.expovariate(comm_rate)
    peak = 0.3 / 30
    t = max(a.start, clock.start) + rng.expovariate(peak)
    while t < clock.now:
        if rng.random() < _complaint_rate(a, t) / peak:
            channel = rng.choice(("phone", "email", "call_center"))
            drafts.append((t, channel, "inbound", "complaint", None, rng.choice(_COMPLAINTS)))
        t += rng.expovariate(peak)
    half_year = 182.6
    t = clock.start
    while t < clock.now:
        when = t + rng.uniform(0.0, half_year)
        if (
            rng.random() < 0.55
            and a.start <= when < clock.now
            and _engagement(a, when, clock.now) >= 0.1
        ):
            drifting = a.churning and when > a.decay_start - 30
            weights = _UNHAPPY if drifting else a.happiness
            rating = rng.choices((1, 2, 3, 4, 5), weights=weights)[0]
            drafts.append(
                (when, "web", "inbound", "survey", rating, "Customer satisfaction survey")
            )
        t += half_year

    placed = []
    for t, channel, direction, kind, score, summary in drafts:
        when = clock.business_time(t, rng)
        if when < clock.now:
            placed.append((when, channel, direction, kind, score, summary))
    placed.sort(key=lambda d: d[0])
    out: list[tuple[float, dict[str, Any]]] = []
    for k, (t, channel, direction, kind, score, summary) in enumerate(placed, start=1):
        external_id = f"INT-{a.index:05d}-{k:04d}"
        event: dict[str, Any] = {
            "type": "interaction",
            "event_id": f"demo-{seed}-interaction-{external_id}-v1",
            "version": 1,
            "external_id": external_id,
            "account_external_id": a.external_id,
            "channel": channel,
            "direction": direction,
            "kind": kind,
            "occurred_at": clock.stamp(t),
            "summary": summary,
        }
        if a.contacts and rng.random() < 0.85:
            event["contact_external_id"] = rng.choice(a.contacts)[0]
        if score is not None:
            event["satisfaction"] = score
        out.append((t, event))
    return out


def generate_portfolio(
    accounts: int, *, seed: int = 7, years: float = 2.0, now: datetime | None = None
) -> list[dict[str, Any]]:
    """The demo portfolio as mixed-batch events (each with a ``type``), in the order to send.

    Managers come first, then accounts (groups before their subsidiaries), contacts, then each
    account's orders, invoices and interactions in time order, and last the updates that mark
    lost accounts. Only schema fields are set, so every event validates as it is.
    """
    if accounts < 1:
        raise ValueError("accounts must be at least 1")
    if not 0 < years <= 50:
        raise ValueError("years must be more than 0 and at most 50")
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must carry a time zone")
    rng = random.Random(seed)
    clock = _Clock(now.astimezone(UTC), years)
    managers = max(1, accounts // 25)

    events = _managers(rng, managers, seed)
    portfolio = _profiles(rng, accounts, clock)
    _assign_groups(rng, portfolio)
    _assign_managers(rng, portfolio, managers)
    events += [_account_event(a, seed) for a in portfolio if a.parent is None]
    events += [_account_event(a, seed) for a in portfolio if a.parent is not None]
    for a in portfolio:
        events += _contacts(rng, a, seed)
    for a in portfolio:
        activity = _orders_and_payments(rng, a, clock, seed) + _interactions(rng, a, clock, seed)
        activity.sort(key=lambda item: item[0])  # stable: an invoice stays after its order
        events += [event for _, event in activity]
    for a in portfolio:
        if a.lost:
            lost = _account_event(a, seed, version=2)
            lost["status"] = "lost"
            lost["churn_reason"] = rng.choice(_CHURN_REASONS)
            events.append(lost)
    return events


# --- sending --------------------------------------------------------------------------------


class DemoSendError(RuntimeError):
    """The API refused a whole batch; the message carries its problem detail."""


@dataclass(slots=True)
class DemoSummary:
    """What the API answered, summed over all batches. ``accepted`` includes ``stale``."""

    accepted: int = 0
    stale: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)
    portfolio_pass_queued: bool = False


def _phase(event: Mapping[str, Any]) -> int:
    """Events of a later phase may point at entities of an earlier one, so phases are sent one
    after the other; stubs would cope, but the first rescore would then see half an account."""
    kind = event.get("type")
    if kind == "manager":
        return 0
    if kind == "account":
        if (event.get("version") or 1) > 1:
            return 5
        return 2 if event.get("parent_external_id") else 1
    if kind == "contact":
        return 3
    return 4


def _phased_batches(
    events: Sequence[Mapping[str, Any]], batch_size: int
) -> list[list[list[bytes]]]:
    """Batches of encoded events, grouped by phase: a batch holds consecutive events of one phase
    and stops at ``batch_size`` events or ~900 KiB, below the server's 1 MiB body limit."""
    phases: list[list[list[bytes]]] = []
    phase = None
    size = 0
    for event in events:
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        this = _phase(event)
        if this != phase:
            phases.append([[]])
            phase, size = this, 0
        elif len(phases[-1][-1]) >= batch_size or size + len(body) > MAX_BATCH_BYTES:
            phases[-1].append([])
            size = 0
        phases[-1][-1].append(body)
        size += len(body) + 1
    return phases


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if not isinstance(body, dict):
        return str(body)[:500]
    text = str(body.get("title") or response.reason_phrase)
    if body.get("detail"):
        text += f": {body['detail']}"
    errors = body.get("errors")
    if isinstance(errors, list) and errors:
        shown = [f"{e.get('field')}: {e.get('message')}" for e in errors[:5] if isinstance(e, dict)]
        text += f" ({'; '.join(shown)})"
    return text


async def _post_batch(client: httpx.AsyncClient, batch: list[bytes], summary: DemoSummary) -> None:
    content = b'{"events":[' + b",".join(batch) + b"]}"
    for attempt in range(RETRIES_WHEN_UNAVAILABLE + 1):
        response = await client.post(
            "/v1/events", content=content, headers={"Content-Type": "application/json"}
        )
        if response.status_code != 503 or attempt == RETRIES_WHEN_UNAVAILABLE:
            break
        # 503 means Postgres or Redis is briefly away; the server says when to come back.
        try:
            delay = min(30.0, float(response.headers.get("Retry-After", "2")))
        except ValueError:
            delay = 2.0
        await asyncio.sleep(delay)
    if response.status_code != 202:
        raise DemoSendError(
            f"POST /v1/events answered {response.status_code}: {_problem(response)}"
        )
    answer = response.json()
    summary.batches += 1
    summary.accepted += answer["accepted"]
    summary.stale += answer["stale"]
    summary.duplicates += answer["duplicates"]
    summary.rejected += answer["rejected"]
    for result in answer["results"]:
        if result["status"] != "rejected" or len(summary.errors) >= MAX_REPORTED_ERRORS:
            continue
        errors = "; ".join(f"{e['field']}: {e['message']}" for e in result.get("errors") or ())
        summary.errors.append(f"{result.get('event_id') or result['index']}: {errors}")


async def send_events(
    client: httpx.AsyncClient,
    events: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 500,
    concurrency: int = 4,
) -> DemoSummary:
    """Send ``events`` in order through ``POST /v1/events``, a few batches at a time.

    Batches never mix phases (managers, accounts, subsidiaries, contacts, activity, updates) and
    a phase starts once the one before is stored. Raises ``DemoSendError`` with the problem
    detail when a batch is not answered 202; a 503 is retried after its Retry-After first.
    """
    if not 1 <= batch_size <= MAX_BATCH_EVENTS:
        raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_EVENTS}")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    summary = DemoSummary()

    async def worker(batches: Iterator[list[bytes]]) -> None:
        for batch in batches:  # shared iterator: each worker takes the next unsent batch
            await _post_batch(client, batch, summary)

    for batches in _phased_batches(events, batch_size):
        pending = iter(batches)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(concurrency, len(batches))):
                    group.create_task(worker(pending))
        except ExceptionGroup as failed:
            # One failed batch stops the others; its own error says more than the group.
            raise failed.exceptions[0] from None
    return summary


async def _run(url: str, api_key: str, events: list[dict[str, Any]]) -> DemoSummary:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        summary = await send_events(client, events)
        # A new portfolio deserves population facts of its own at once, not at the next hour.
        rescore = await client.post("/v1/portfolio/rescore")
        summary.portfolio_pass_queued = rescore.status_code == 202
        return summary


def run_demo(*, url: str, api_key: str, accounts: int, seed: int = 7, years: float = 2.0) -> int:
    """Generate the portfolio, send it to ``url`` and print what happened.

    Returns 0 when every event was stored (or was a duplicate of an earlier run), 1 otherwise.
    """
    started = time.perf_counter()
    try:
        events = generate_portfolio(accounts, seed=seed, years=years)
    except ValueError as exc:
        print(f"kam demo: {exc}", file=sys.stderr)
        return 1
    counts = Counter(event["type"] for event in events)
    print(
        f"sending {accounts} accounts, {counts['manager']} managers, {counts['order']} orders, "
        f"{counts['contact']} contacts, {counts['interaction']} interactions, "
        f"{counts['payment']} payments ({len(events)} events) to {url}",
        flush=True,
    )
    try:
        summary = asyncio.run(_run(url, api_key, events))
    except DemoSendError as exc:
        print(f"kam demo: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"kam demo: cannot reach {url}: {exc!r}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(
        f"{summary.accepted} accepted ({summary.stale} stale), {summary.duplicates} duplicates, "
        f"{summary.rejected} rejected in {summary.batches} batches; {elapsed:.1f} s, "
        f"{len(events) / max(elapsed, 1e-9):.0f} events/s"
    )
    if summary.portfolio_pass_queued:
        print("portfolio pass queued: tiers and risks follow in the scorer")
    else:
        print(
            "the portfolio pass could not be queued (the key needs policy:write); the hourly "
            "pass will score the portfolio"
        )
    for error in summary.errors:
        print(f"  rejected {error}", file=sys.stderr)
    return 0 if summary.rejected == 0 else 1
