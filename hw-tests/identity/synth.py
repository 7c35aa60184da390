"""Synthetic Japanese patients and the records hospitals keep of them (名寄せ test data).

Everything is drawn from a `random.Random` the caller seeds, so a seed gives the same
people, records and pairs on every machine (no `hash()` of strings, no set iteration).

- `Population`: people with a realistic skew: family names by national rank (names.py),
  given names by sex and birth cohort, birth dates of a hospital population (older people
  more often), addresses of a clinic region (prefecture, city, town, N丁目N番N号, building
  and room, postal code), landline (the household's) and mobile phones, health insurance
  (insurer number, 記号, 番号, 枝番; family members share the insured's number with
  their own branch; 後期高齢 for 75+, 国保 with 6-digit insurer numbers). `household()`
  makes families (couples, children, twins, three generations, a junior with his
  father's given name) and `nursing_home()` residents who share an address and phone.
- `Style`: how one hospital's system writes a record: kana script (katakana, hiragana,
  half-width; without small kana), glyph support (extended kanji or not), names split or
  in the family field, date format (western, 和暦 in kanji, abbreviated S55.1.2, S550102,
  era-coded 3550102), sex codes, digit width, address notation, phone and postal code
  punctuation, insurance fields kept or not. `HOSPITALS` is a catalogue of eight.
- `render(person, style, rng)`: one record (the JSON the matcher reads).
- Variations of one person between two records: `marry`, `move`, `change_job`, and
  record-level `typo_*` / `drop_fields`.
- `make_pairs(seed, n)`: labelled pairs, half the same person (`match`) and half
  look-alikes (`nonmatch`), each with the phenomenon it exercises.
"""

from __future__ import annotations

import bisect
import copy
import datetime as dt
import itertools
import random
import unicodedata
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

try:  # as a package (hw-tests/identity) or as scripts next to each other
    from . import names
except ImportError:  # pragma: no cover
    import names  # type: ignore[no-redef]

TODAY = dt.date(2026, 12, 1)

FIELDS = (
    "hospital_id", "patient_id", "family_name", "given_name", "family_kana", "given_kana", "sex",
    "birth_date", "address", "postal_code", "phone", "insurer_number", "insurance_symbol",
    "insurance_number", "insurance_branch",
)


def stable_hash(*parts: Any) -> int:
    """A hash that does not change between runs (PYTHONHASHSEED)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


# --------------------------------------------------------------------------
# kana and digits


def to_hiragana(s: str) -> str:
    return "".join(chr(ord(c) - 0x60) if "ァ" <= c <= "ヶ" and c not in "ヵヶ" else c for c in s)


def _half_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for cp in range(0xFF61, 0xFFA0):
        h = chr(cp)
        full = unicodedata.normalize("NFKC", h)
        if len(full) == 1:
            table.setdefault(full, h)
    # voiced and semi-voiced: base + ﾞ / ﾟ
    for cp in range(0x30A1, 0x30F7):
        c = chr(cp)
        if c in table:
            continue
        d = unicodedata.normalize("NFD", c)
        if len(d) == 2 and d[0] in table:
            table[c] = table[d[0]] + ("ﾞ" if d[1] == "\u3099" else "ﾟ")
    table["　"] = " "
    return table


_HALF = _half_table()


def to_halfwidth_kana(s: str) -> str:
    return "".join(_HALF.get(c, c) for c in s)


_SMALL = str.maketrans("ァィゥェォャュョッヮ", "アイウエオヤユヨツワ")
_O_ROW = set("オコソトノホモヨロゴゾドボポョ")
_U_ROW = set("ウクスツヌフムユルグズヅブプュ")


def big_kana(s: str) -> str:
    """Small kana written big, as systems limited to one kana size do (シュウ -> シユウ)."""
    return s.translate(_SMALL)


def long_vowel_bar(s: str) -> str:
    """Long vowels written with ー (ユウコ -> ユーコ, オオノ -> オーノ, サトウ -> サトー)."""
    out = []
    for i, c in enumerate(s):
        prev = s[i - 1] if i else ""
        if (c == "ウ" and (prev in _O_ROW or prev in _U_ROW)) or (c == "オ" and prev in _O_ROW):
            out.append("ー")
        else:
            out.append(c)
    return "".join(out)


def kana_spellings(s: str) -> list[str]:
    """The other ways one reading gets written in katakana (excluding `s` itself)."""
    cands = [long_vowel_bar(s), big_kana(s), long_vowel_bar(big_kana(s))]
    out: list[str] = []
    for c in cands:
        if c != s and c not in out:
            out.append(c)
    return out


_FULL_DIGITS = str.maketrans("0123456789-", "０１２３４５６７８９－")


def full_width(s: str) -> str:
    return s.translate(_FULL_DIGITS)


_KANJI_DIGIT = "〇一二三四五六七八九"


def kanji_number(n: int) -> str:
    if n < 10:
        return _KANJI_DIGIT[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return ("" if tens == 1 else _KANJI_DIGIT[tens]) + "十" + ("" if ones == 0 else _KANJI_DIGIT[ones])
    return "".join(_KANJI_DIGIT[int(d)] for d in str(n))


# typing errors in kana: a vowel of the same consonant row, or (un)voicing
_ROWS = [
    "アイウエオ", "カキクケコ", "ガギグゲゴ", "サシスセソ", "ザジズゼゾ", "タチツテト", "ダヂヅデド",
    "ナニヌネノ", "ハヒフヘホ", "バビブベボ", "パピプペポ", "マミムメモ", "ヤユヨ", "ラリルレロ", "ワヲン",
]
_VOICE = {}
for _a, _b in zip("カキクケコサシスセソタチツテトハヒフヘホ", "ガギグゲゴザジズゼゾダヂヅデドバビブベボ"):
    _VOICE[_a], _VOICE[_b] = _b, _a


def kana_typo(s: str, rng: random.Random) -> str:
    idx = [i for i, c in enumerate(s) if any(c in row for row in _ROWS)]
    if not idx:
        return s
    i = rng.choice(idx)
    c = s[i]
    if c in _VOICE and rng.random() < 0.4:
        new = _VOICE[c]
    else:
        row = next(r for r in _ROWS if c in r)
        new = rng.choice([x for x in row if x != c] or [c])
    return s[:i] + new + s[i + 1:]


# --------------------------------------------------------------------------
# dates

ERAS = [  # name, letter, code, first day
    ("令和", "R", 5, dt.date(2019, 5, 1)),
    ("平成", "H", 4, dt.date(1989, 1, 8)),
    ("昭和", "S", 3, dt.date(1926, 12, 25)),
    ("大正", "T", 2, dt.date(1912, 7, 30)),
    ("明治", "M", 1, dt.date(1868, 1, 25)),
]

DATE_FORMATS = (
    "iso", "slash", "compact", "jp_western", "era_kanji", "era_kanji_pad", "era_abbr", "era_abbr_pad",
    "era_compact", "era_coded",
)


def era_of(d: dt.date) -> tuple[str, str, int, int]:
    for name, letter, code, start in ERAS:
        if d >= start:
            return name, letter, code, d.year - start.year + 1
    raise ValueError("date before 明治")


def format_date(d: dt.date, fmt: str, rng: random.Random | None = None) -> str:
    y, m, day = d.year, d.month, d.day
    if fmt == "iso":
        return f"{y:04d}-{m:02d}-{day:02d}"
    if fmt == "slash":
        return f"{y}/{m}/{day}"
    if fmt == "compact":
        return f"{y:04d}{m:02d}{day:02d}"
    if fmt == "jp_western":
        return f"{y}年{m}月{day}日"
    name, letter, code, ey = era_of(d)
    if fmt == "era_kanji":
        gan = "元" if ey == 1 and (rng is None or rng.random() < 0.7) else str(ey)
        return f"{name}{gan}年{m}月{day}日"
    if fmt == "era_kanji_pad":
        return f"{name}{ey:02d}年{m:02d}月{day:02d}日"
    if fmt == "era_abbr":
        return f"{letter}{ey}.{m}.{day}"
    if fmt == "era_abbr_pad":
        return f"{letter}{ey:02d}.{m:02d}.{day:02d}"
    if fmt == "era_compact":
        return f"{letter}{ey:02d}{m:02d}{day:02d}"
    if fmt == "era_coded":
        return f"{code}{ey:02d}{m:02d}{day:02d}"
    raise ValueError(fmt)


def date_typo(d: dt.date, rng: random.Random) -> dt.date:
    """One slip of a digit: the day or month off by one key, a year digit, or day/month swapped."""
    for _ in range(20):
        kind = rng.random()
        try:
            if kind < 0.4:
                new = d.replace(day=max(1, min(28, d.day + rng.choice([-1, 1, 10, -10]))))
            elif kind < 0.6:
                new = d.replace(month=max(1, min(12, d.month + rng.choice([-1, 1]))))
            elif kind < 0.8:
                new = d.replace(year=d.year + rng.choice([-1, 1, -10, 10]))
            else:
                new = d.replace(month=d.day, day=d.month)
        except ValueError:
            continue
        if new != d and new <= TODAY:
            return new
    return d


def digit_typo(s: str, rng: random.Random) -> str:
    """One wrong digit or two neighbours swapped in a string of digits."""
    idx = [i for i, c in enumerate(s) if c.isdigit()]
    if len(idx) < 2:
        return s
    if rng.random() < 0.3:
        j = rng.randrange(len(idx) - 1)
        a, b = idx[j], idx[j + 1]
        if s[a] != s[b]:
            return s[:a] + s[b] + s[a + 1:b] + s[a] + s[b + 1:]
    i = rng.choice(idx[1:])  # never the leading 0 of a phone
    return s[:i] + str((int(s[i]) + rng.choice([1, 2, 8, 9])) % 10) + s[i + 1:]


# --------------------------------------------------------------------------
# people


@dataclass
class Address:
    pref: str
    city: str
    town: str
    chome: int | None
    ban: int
    go: int | None
    building: str | None
    room: int | None
    postal: str  # 7 digits
    area: str  # phone area code


@dataclass
class Insurance:
    insurer: str
    symbol: str | None
    number: str
    branch: str


@dataclass
class Person:
    family: str
    family_kana: str
    given: str
    given_kana: str
    sex: str  # "M" / "F"
    birth: dt.date
    address: Address
    landline: str | None
    mobile: str | None
    insurance: Insurance | None
    tags: list[str] = field(default_factory=list)

    def age(self, on: dt.date = TODAY) -> int:
        return on.year - self.birth.year - ((on.month, on.day) < (self.birth.month, self.birth.day))


class _Weighted:
    def __init__(self, items: list[Any], weights: list[float]):
        self.items = items
        self.cum = list(itertools.accumulate(weights))

    def pick(self, rng: random.Random) -> Any:
        return self.items[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]


class Population:
    """Draws people, households and nursing homes."""

    def __init__(self) -> None:
        fam = names.family_names()
        self.family = _Weighted([(k, r) for k, r, _ in fam], [w for _, _, w in fam])
        self.family_common = [(k, r) for k, r, _ in fam[:30]]
        self.family_with_old = [(k, r) for k, r, _ in fam[:200] if any(c in names.NEW_TO_OLD for c in k)]
        self.given: dict[tuple[str, str], _Weighted] = {}
        for sex in ("M", "F"):
            gs = names.given_names(sex)
            for cohort in ("o", "m", "y"):
                ws = [3.0 if c == cohort else 1.2 if c == "*" else 0.15 for _, _, c in gs]
                self.given[(sex, cohort)] = _Weighted([(k, r) for k, r, _ in gs], ws)
        self.city = _Weighted(names.CITIES, [c[4] for c in names.CITIES])
        self.towns: dict[str, list[str]] = {}
        for c in names.CITIES:
            r = random.Random(stable_hash("towns", c[1]))
            pool = names.TOWNS if c[0] in ("神奈川県", "東京都") else names.GENERIC_TOWNS
            self.towns[c[1]] = r.sample(pool, 10)
        # ages of a hospital population: more of the old
        ages = list(range(0, 101))
        self.age = _Weighted(ages, [0.6 if a < 15 else 0.5 if a < 40 else 1.0 if a < 60 else 1.8 if a < 90 else 0.6 for a in ages])

    # -- parts ----------------------------------------------------------------

    def family_name(self, rng: random.Random) -> tuple[str, str]:
        k, r = self.family.pick(rng)
        if rng.random() < 0.06:
            k = old_form(k, rng)
        return k, r

    def given_name(self, rng: random.Random, sex: str, birth: dt.date) -> tuple[str, str]:
        cohort = "o" if birth.year < 1955 else "m" if birth.year < 1990 else "y"
        k, r = self.given[(sex, cohort)].pick(rng)
        if rng.random() < 0.04:
            k = old_form(k, rng)
        return k, r

    def birth_for_age(self, rng: random.Random, age: int) -> dt.date:
        y = TODAY.year - age - 1
        return dt.date(y, 1, 1) + dt.timedelta(days=rng.randrange(365))

    def birth(self, rng: random.Random, lo: int = 0, hi: int = 100) -> dt.date:
        for _ in range(50):
            a = self.age.pick(rng)
            if lo <= a <= hi:
                return self.birth_for_age(rng, a)
        return self.birth_for_age(rng, rng.randint(lo, hi))

    def address(self, rng: random.Random, city: tuple | None = None) -> Address:
        pref, cname, area, postal3, _ = city or self.city.pick(rng)
        town_i = rng.randrange(10)
        town = self.towns[cname][town_i]
        has_chome = stable_hash(cname, town) % 4 != 0
        chome = rng.randint(1, 6) if has_chome else None
        ban = rng.randint(1, 30) if has_chome else rng.randint(1, 2400)
        go = rng.randint(1, 25) if rng.random() < 0.85 else None
        building = room = None
        if rng.random() < 0.35:
            building = rng.choice(names.BUILDINGS_A) + rng.choice(names.BUILDINGS_B)
            room = rng.randint(1, 12) * 100 + rng.randint(1, 12)
        postal = f"{postal3}{stable_hash(cname, town, chome) % 10000:04d}"
        return Address(pref, cname, town, chome, ban, go, building, room, postal, area)

    def landline(self, rng: random.Random, area: str) -> str:
        rest = 9 - (len(area) - 1)
        return area + str(rng.randint(2, 9)) + "".join(str(rng.randrange(10)) for _ in range(rest - 1))

    def mobile(self, rng: random.Random) -> str:
        return rng.choice(["090", "080", "070"]) + "".join(str(rng.randrange(10)) for _ in range(8))

    def insurance(self, rng: random.Random, age: int, pref_code: str = "14") -> Insurance:
        if age >= 75:
            return Insurance(f"39{pref_code}{rng.randrange(1000):03d}{rng.randrange(10)}", None,
                             f"{rng.randrange(10**8):08d}", "")
        if rng.random() < 0.3:  # 国保 (self-employed, retired): 6-digit insurer number
            return Insurance(f"{pref_code}{rng.randrange(10000):04d}", rng.choice(["港北", "青葉", "あ", "12", "3", "藤沢"]),
                             str(rng.randint(1, 999999)), "00")
        prefix = rng.choice(["01", "01", "01", "06", "06", "31", "32", "34"])
        return Insurance(f"{prefix}{pref_code}{rng.randrange(10000):04d}",
                         str(rng.randint(1, 99999999)) if prefix == "01" else str(rng.randint(1, 9999)),
                         str(rng.randint(1, 99999)), "00")

    def person(self, rng: random.Random, *, sex: str | None = None, birth: dt.date | None = None,
               family: tuple[str, str] | None = None, address: Address | None = None,
               landline: str | None = None, insurance: Insurance | None = None) -> Person:
        sex = sex or rng.choice("MF")
        birth = birth or self.birth(rng)
        fam = family or self.family_name(rng)
        giv = self.given_name(rng, sex, birth)
        addr = address or self.address(rng)
        age = TODAY.year - birth.year
        if landline is None and rng.random() < (0.75 if age > 60 else 0.4):
            landline = self.landline(rng, addr.area)
        mobile = self.mobile(rng) if rng.random() < (0.95 if 15 < age < 75 else 0.5) else None
        ins = insurance or self.insurance(rng, age)
        return Person(fam[0], fam[1], giv[0], giv[1], sex, birth, addr, landline, mobile, ins)

    # -- groups ---------------------------------------------------------------

    def dependent_insurance(self, rng: random.Random, head: Insurance | None, age: int) -> Insurance:
        if age >= 75 or head is None or head.insurer.startswith("39"):
            return self.insurance(rng, age)
        return replace(head, branch=f"{rng.randint(1, 6):02d}")

    def household(self, rng: random.Random) -> list[Person]:
        """One household: 1-6 people sharing family name, address and landline."""
        kind = rng.random()
        fam = self.family_name(rng)
        addr = self.address(rng)
        line = self.landline(rng, addr.area) if rng.random() < 0.7 else None
        if kind < 0.3:
            return [self.person(rng, family=fam, address=addr, landline=line)]
        head_sex = "M" if rng.random() < 0.9 else "F"
        head_birth = self.birth(rng, 25, 95)
        head = self.person(rng, sex=head_sex, birth=head_birth, family=fam, address=addr, landline=line)
        people = [head]
        spouse_birth = self.birth_for_age(rng, max(18, head.age() + rng.randint(-6, 4)))
        spouse = self.person(rng, sex="F" if head_sex == "M" else "M", birth=spouse_birth, family=fam,
                             address=addr, landline=line,
                             insurance=self.dependent_insurance(rng, head.insurance, TODAY.year - spouse_birth.year))
        people.append(spouse)
        if kind < 0.45 or head.age() < 22:
            return people
        n_kids = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        mother_age = spouse.age() if spouse.sex == "F" else head.age()
        kid_births: list[dt.date] = []
        for _ in range(n_kids):
            a = mother_age - rng.randint(22, 40)
            if a < 0:
                continue
            kid_births.append(self.birth_for_age(rng, a))
        if kid_births and rng.random() < 0.04:  # twins
            kid_births.append(kid_births[0])
        used: set[str] = set()
        for b in kid_births:
            sex = rng.choice("MF")
            kid = self.person(rng, sex=sex, birth=b, family=fam, address=addr, landline=line,
                              insurance=self.dependent_insurance(rng, head.insurance, TODAY.year - b.year))
            for _ in range(10):  # siblings (twins too) have different given names
                if kid.given not in used:
                    break
                kid.given, kid.given_kana = self.given_name(rng, sex, b)
            used.add(kid.given)
            if sex == head.sex and b.year - head.birth.year >= 20 and rng.random() < 0.03:
                kid.given, kid.given_kana = head.given, head.given_kana  # a junior
                kid.tags.append("junior")
            people.append(kid)
        return people

    def nursing_home(self, rng: random.Random, n: int) -> list[Person]:
        """Residents of one home: the home's address and phone, 後期高齢 insurance."""
        addr = self.address(rng)
        addr.building = rng.choice(names.HOMES)
        addr.room = rng.randint(101, 330)
        phone = self.landline(rng, addr.area)
        insurer = f"3914{rng.randrange(1000):03d}{rng.randrange(10)}"
        out = []
        for _ in range(n):
            a = replace(addr, room=rng.randint(101, 330))
            p = self.person(rng, birth=self.birth(rng, 75, 100), address=a, landline=phone,
                            insurance=Insurance(insurer, None, f"{rng.randrange(10**8):08d}", ""))
            p.mobile = None
            out.append(p)
        return out


def old_form(kanji: str, rng: random.Random) -> str:
    """The name with its old/variant forms where it has one (高 -> 髙, 吉 -> 𠮷 ...)."""
    out = []
    for c in kanji:
        olds = names.NEW_TO_OLD.get(c)
        out.append(rng.choice(olds) if olds else c)
    return "".join(out)


def new_form(kanji: str, glyphs: str) -> str:
    """What a system with `glyphs` support stores: "full" keeps every form, "bmp" loses
    the characters outside the BMP (𠮷), "jis" every form outside JIS X 0208."""
    if glyphs == "full":
        return kanji
    if glyphs == "bmp":
        return "".join(names.OLD_TO_NEW.get(c, c) if ord(c) > 0xFFFF else c for c in kanji)
    return "".join(names.OLD_TO_NEW.get(c, c) for c in kanji)


# --------------------------------------------------------------------------
# life between two records


def marry(pop: Population, p: Person, rng: random.Random, *, move: bool | None = None) -> Person:
    q = copy.deepcopy(p)
    for _ in range(20):
        fam = pop.family_name(rng)
        if fam[1] != p.family_kana:
            break
    q.family, q.family_kana = fam
    if move if move is not None else rng.random() < 0.7:
        q.address = pop.address(rng)
        q.landline = pop.landline(rng, q.address.area) if rng.random() < 0.5 else None
    if rng.random() < 0.7:
        q.insurance = pop.insurance(rng, p.age())
    return q


def move(pop: Population, p: Person, rng: random.Random) -> Person:
    q = copy.deepcopy(p)
    near = next(c for c in names.CITIES if c[1] == p.address.city) if rng.random() < 0.5 else None
    q.address = pop.address(rng, near)
    if q.landline is not None or rng.random() < 0.3:
        q.landline = pop.landline(rng, q.address.area)
    if p.age() < 75 and q.insurance is not None and q.insurance.insurer[:2] not in ("01", "06", "31", "32", "34"):
        q.insurance = pop.insurance(rng, p.age())  # 国保 is per municipality
    return q


def change_job(pop: Population, p: Person, rng: random.Random) -> Person:
    q = copy.deepcopy(p)
    for _ in range(10):
        ins = pop.insurance(rng, min(p.age(), 74))
        if q.insurance is None or ins.insurer != q.insurance.insurer:
            break
    q.insurance = ins
    if rng.random() < 0.2:
        q.mobile = pop.mobile(rng)
    return q


# --------------------------------------------------------------------------
# how a hospital's system writes a record


@dataclass(frozen=True)
class Style:
    kana: str = "kata"  # kata | hira | half | none
    small_kana: bool = True  # False: a system without small kana (シユウ)
    long_bar: float = 0.1  # share of records with long vowels written ー
    glyphs: str = "full"  # full | bmp | jis
    name_split: str = "split"  # split | space_half | space_full | nospace
    date: str = "iso"
    sex: str = "MF"  # MF | 12 | jp
    digits: str = "ascii"  # ascii | full
    addr: str = "kanji"  # kanji | kanji_num | hyphen | banchi
    hyphen: str = "-"
    pref: float = 0.95  # share of records with the prefecture
    building: float = 0.9  # share with the building (when there is one)
    phone: str = "hyphen"  # hyphen | plain | paren
    prefer_mobile: float = 0.5
    postal: str = "hyphen"  # hyphen | plain | mark | none
    insurance: float = 0.95  # share of records with insurance fields
    branch: bool = True
    id_format: str = "{:08d}"


HOSPITALS: list[tuple[str, Style]] = [
    ("1410000017", Style()),
    ("1410000025", Style(kana="hira", date="era_kanji", sex="jp", addr="kanji_num", phone="plain",
                         postal="mark", glyphs="bmp", id_format="A-{:06d}")),
    ("1410000033", Style(kana="half", small_kana=False, date="era_coded", sex="12", digits="ascii",
                         addr="hyphen", hyphen="－", glyphs="jis", name_split="space_half",
                         branch=False, postal="plain", id_format="{:010d}")),
    ("1410000041", Style(kana="kata", date="slash", addr="hyphen", hyphen="ー", phone="paren",
                         digits="full", glyphs="jis", long_bar=0.3, id_format="K{:07d}")),
    ("1310000059", Style(kana="kata", date="era_abbr", sex="MF", addr="banchi", pref=0.3,
                         name_split="space_full", building=0.5, id_format="{:07d}")),
    ("1310000067", Style(kana="half", small_kana=True, date="compact", sex="12", addr="hyphen",
                         hyphen="‐", phone="plain", glyphs="bmp", insurance=0.6, id_format="T{:06d}")),
    ("1410000075", Style(kana="kata", small_kana=False, date="era_compact", sex="jp", addr="kanji",
                         digits="full", phone="hyphen", prefer_mobile=0.8, glyphs="jis", id_format="{:06d}-0")),
    ("1410000083", Style(kana="hira", date="jp_western", addr="hyphen", hyphen="−", pref=0.5,
                         name_split="nospace", postal="none", branch=False, id_format="C{:05d}")),
]


def _digits(s: str, style: Style) -> str:
    return full_width(s) if style.digits == "full" else s


def _space(style: Style) -> str:
    return {"space_half": " ", "space_full": "　", "nospace": ""}.get(style.name_split, " ")


def render_address(a: Address, style: Style, rng: random.Random) -> str:
    city = a.city
    if city in names.CITY_SPELLINGS:
        city = rng.choice(names.CITY_SPELLINGS[city])
    head = (a.pref if rng.random() < style.pref else "") + city + a.town
    h = style.hyphen
    if style.addr == "hyphen":
        nums = [a.chome, a.ban, a.go] if a.chome else [a.ban, a.go]
        body = h.join(str(n) for n in nums if n is not None)
        body = _digits(body, style)
    elif style.addr == "kanji_num":
        body = (f"{kanji_number(a.chome)}丁目" if a.chome else "") + f"{a.ban}番" + (f"{a.go}号" if a.go else "")
        if not a.chome:
            body = f"{a.ban}番地" + (f"{a.go}" if a.go else "")
        body = _digits(body, style)
    elif style.addr == "banchi":
        body = (f"{a.chome}丁目" if a.chome else "") + f"{a.ban}番地" + (f"{a.go}" if a.go else "")
        body = _digits(body, style)
    else:
        body = (f"{a.chome}丁目{a.ban}番" + (f"{a.go}号" if a.go else "")) if a.chome else (
            f"{a.ban}番地" + (f"の{a.go}" if a.go else ""))
        body = _digits(body, style)
    out = head + body
    if a.building and rng.random() < style.building:
        room = _digits(str(a.room), style) if a.room else ""
        sep = rng.choice([" ", "　", ""])
        out += sep + a.building + (rng.choice([f"{room}号室", f" {room}", f"-{room}"]) if room else "")
    return out


AREA_CODES = sorted({c[2] for c in names.CITIES}, key=len, reverse=True)


def render_phone(num: str, style: Style) -> str:
    if num.startswith(("090", "080", "070")):
        parts = [num[:3], num[3:7], num[7:]]
    else:
        area = next((a for a in AREA_CODES if num.startswith(a)), num[:3])
        rest = num[len(area):]
        parts = [area, rest[:-4], rest[-4:]]
    if style.phone == "plain":
        s = num
    elif style.phone == "paren":
        s = f"{parts[0]}({parts[1]}){parts[2]}"
    else:
        s = "-".join(parts)
    return _digits(s, style)


def render_kana(k: str, style: Style, rng: random.Random) -> str:
    if not style.small_kana:
        k = big_kana(k)
    if rng.random() < style.long_bar:
        k = long_vowel_bar(k)
    if style.kana == "hira":
        return to_hiragana(k)
    if style.kana == "half":
        return to_halfwidth_kana(k)
    return k


def render(p: Person, style: Style, rng: random.Random, *, hospital_id: str = "", patient_id: str = "",
           phone: str | None = None) -> dict[str, Any]:
    """One hospital's record of `p` (every field a string or None)."""
    r: dict[str, Any] = dict.fromkeys(FIELDS)
    r["hospital_id"] = hospital_id or None
    r["patient_id"] = patient_id or None
    fam, giv = new_form(p.family, style.glyphs), new_form(p.given, style.glyphs)
    fk, gk = (render_kana(p.family_kana, style, rng), render_kana(p.given_kana, style, rng))
    if style.name_split == "split":
        r["family_name"], r["given_name"] = fam, giv
        if style.kana != "none":
            r["family_kana"], r["given_kana"] = fk, gk
    else:
        sp = _space(style)
        r["family_name"] = fam + sp + giv
        if style.kana != "none":
            ksp = " " if style.kana == "half" and sp else sp
            r["family_kana"] = fk + ksp + gk
    r["sex"] = {"MF": p.sex, "12": "1" if p.sex == "M" else "2", "jp": "男" if p.sex == "M" else "女"}[style.sex]
    r["birth_date"] = _digits(format_date(p.birth, style.date, rng), style)
    r["address"] = render_address(p.address, style, rng)
    if style.postal != "none":
        pc = p.address.postal
        r["postal_code"] = _digits({"hyphen": f"{pc[:3]}-{pc[3:]}", "plain": pc, "mark": f"〒{pc[:3]}-{pc[3:]}"}[style.postal], style)
    num = phone
    if num is None:
        prefer = [p.mobile, p.landline] if rng.random() < style.prefer_mobile else [p.landline, p.mobile]
        num = next((x for x in prefer if x), None)
    if num:
        r["phone"] = render_phone(num, style)
    if p.insurance and rng.random() < style.insurance:
        ins = p.insurance
        r["insurer_number"] = _digits(ins.insurer, style)
        r["insurance_symbol"] = _digits(ins.symbol, style) if ins.symbol else None
        r["insurance_number"] = _digits(ins.number, style)
        if style.branch and ins.branch:
            r["insurance_branch"] = _digits(ins.branch, style)
    return r


# --------------------------------------------------------------------------
# record-level slips


def typo_kana(r: dict[str, Any], rng: random.Random) -> None:
    key = rng.choice([k for k in ("family_kana", "given_kana") if r.get(k)] or ["family_kana"])
    if r.get(key):
        kata = r[key]
        # typo on the katakana form, written back in the record's script
        hira = any("ぁ" <= c <= "ゖ" for c in kata)
        half = any("ｦ" <= c <= "ﾟ" for c in kata)
        base = unicodedata.normalize("NFKC", kata)
        base = "".join(chr(ord(c) + 0x60) if "ぁ" <= c <= "ゖ" else c for c in base)
        new = kana_typo(base, rng)
        r[key] = to_hiragana(new) if hira else to_halfwidth_kana(new) if half else new


def typo_kanji(r: dict[str, Any], rng: random.Random) -> bool:
    for key in rng.sample(["family_name", "given_name"], 2):
        s = r.get(key) or ""
        idx = [i for i, c in enumerate(s) if c in names.HOMOPHONE]
        if idx:
            i = rng.choice(idx)
            r[key] = s[:i] + names.HOMOPHONE[s[i]] + s[i + 1:]
            return True
    return False


def typo_phone(r: dict[str, Any], rng: random.Random) -> None:
    if r.get("phone"):
        r["phone"] = digit_typo(r["phone"], rng) if r["phone"].isascii() else full_width(digit_typo(unicodedata.normalize("NFKC", r["phone"]), rng))


DROPPABLE = [
    ("phone",), ("insurer_number", "insurance_symbol", "insurance_number", "insurance_branch"),
    ("family_kana", "given_kana"), ("family_name", "given_name"), ("postal_code",), ("address",), ("sex",),
]


def drop_fields(r: dict[str, Any], rng: random.Random, n: int = 2) -> list[str]:
    groups = rng.sample(DROPPABLE, n)
    if ("family_kana", "given_kana") in groups and ("family_name", "given_name") in groups:
        groups.remove(("family_name", "given_name"))  # never both names: nothing left to match on
    for g in groups:
        for k in g:
            r[k] = None
    return [g[0] for g in groups]


# --------------------------------------------------------------------------
# labelled pairs

MATCH_PHENOMENA = [
    "plain", "variant_kanji", "kana_script", "kana_spelling", "digits_width", "era_date",
    "address_notation", "phone_punct", "insurance_change", "marriage", "moved", "unsplit_name",
    "typo_kana", "typo_date", "typo_phone", "typo_kanji", "missing_fields", "multi",
]
NONMATCH_PHENOMENA = [
    "common_name", "namesake_same_dob", "twins", "parent_child_same_given", "spouses", "siblings",
    "nursing_home", "same_dob_block", "same_kana_block",
]


class PairMaker:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.pop = Population()
        self.ids: dict[str, itertools.count] = {h: itertools.count(1 + random.Random(stable_hash(seed, h)).randrange(10**5)) for h, _ in HOSPITALS}

    def _pid(self, hospital: int) -> str:
        h, style = HOSPITALS[hospital]
        return style.id_format.format(next(self.ids[h]))

    def _two_hospitals(self) -> tuple[int, int]:
        a, b = self.rng.sample(range(len(HOSPITALS)), 2)
        return a, b

    def _rec(self, p: Person, h: int, style: Style | None = None, **kw: Any) -> dict[str, Any]:
        hid, st = HOSPITALS[h]
        return render(p, style or st, self.rng, hospital_id=hid, patient_id=self._pid(h), **kw)

    # -- match ----------------------------------------------------------------

    def match(self, phen: str) -> tuple[dict, dict, str]:
        rng, pop = self.rng, self.pop
        ha, hb = self._two_hospitals()
        sa, sb = HOSPITALS[ha][1], HOSPITALS[hb][1]
        ops = [phen]
        if phen == "multi":
            ops = rng.sample(["variant_kanji", "kana_script", "kana_spelling", "digits_width", "era_date",
                              "address_notation", "phone_punct", "unsplit_name", "typo_kana", "missing_fields",
                              "insurance_change", "typo_phone"], rng.randint(2, 4))
            if rng.random() < 0.3:
                ops.append(rng.choice(["marriage", "moved"]))
        # the person first: one the variation can show on
        p = pop.person(rng)
        if "marriage" in ops:
            p = pop.person(rng, birth=pop.birth(rng, 22, 85), sex="F" if rng.random() < 0.9 else "M")
        if "kana_spelling" in ops:
            for _ in range(50):
                if kana_spellings(p.family_kana + p.given_kana) and ("marriage" not in ops or p.age() >= 22):
                    break
                p = pop.person(rng)
        if "variant_kanji" in ops and not any(c in names.OLD_TO_NEW for c in p.family + p.given):
            k, r = rng.choice(pop.family_with_old)
            p.family, p.family_kana = old_form(k, rng), r
        q = copy.deepcopy(p)
        post: list[Callable[[dict], Any]] = []
        for op in ops:
            if op == "variant_kanji":
                sa = replace(sa, glyphs="full")
                sb = replace(sb, glyphs=rng.choice(["jis", "bmp"]) if "𠮷" in p.family + p.given else "jis")
            elif op == "kana_script":
                sa = replace(sa, kana="kata")
                sb = replace(sb, kana=rng.choice(["hira", "half"]))
            elif op == "kana_spelling":
                sa = replace(sa, small_kana=True, long_bar=0.0)
                if rng.random() < 0.5 and big_kana(p.family_kana + p.given_kana) != p.family_kana + p.given_kana:
                    sb = replace(sb, small_kana=False, long_bar=0.0)
                else:
                    sb = replace(sb, long_bar=1.0)
            elif op == "digits_width":
                sa, sb = replace(sa, digits="ascii"), replace(sb, digits="full")
            elif op == "era_date":
                sa = replace(sa, date=rng.choice(["iso", "slash", "compact", "jp_western"]))
                sb = replace(sb, date=rng.choice(["era_kanji", "era_kanji_pad", "era_abbr", "era_abbr_pad",
                                                  "era_compact", "era_coded"]))
            elif op == "address_notation":
                sa = replace(sa, addr="kanji", pref=1.0, building=1.0)
                sb = replace(sb, addr=rng.choice(["hyphen", "kanji_num", "banchi"]),
                             hyphen=rng.choice(["-", "－", "ー", "‐", "−", "―", "–"]),
                             pref=rng.choice([0.0, 1.0]), building=rng.choice([0.0, 1.0]))
            elif op == "phone_punct":
                sa = replace(sa, phone="hyphen")
                sb = replace(sb, phone=rng.choice(["plain", "paren"]), digits=rng.choice(["ascii", "full"]))
            elif op == "unsplit_name":
                sa = replace(sa, name_split="split")
                sb = replace(sb, name_split=rng.choice(["space_half", "space_full", "nospace"]))
            elif op == "insurance_change":
                q = change_job(pop, q, rng)
            elif op == "marriage":
                q = marry(pop, q, rng)
            elif op == "moved":
                q = move(pop, q, rng)
            elif op == "typo_kana":
                post.append(lambda r: typo_kana(r, rng))
            elif op == "typo_date":
                q.birth = date_typo(q.birth, rng)
            elif op == "typo_phone":
                post.append(lambda r: typo_phone(r, rng))
            elif op == "typo_kanji":
                post.append(lambda r: typo_kanji(r, rng) or typo_kana(r, rng))
            elif op == "missing_fields":
                post.append(lambda r: drop_fields(r, rng, rng.choice([1, 2, 2, 3])))
        # when the variation is in how the phone is written, both records carry the number
        phone_a = phone_b = None
        if "phone_punct" in ops or "typo_phone" in ops:
            num = p.mobile or p.landline
            if num is None:
                num = p.mobile = q.mobile = pop.mobile(rng)
            phone_a = num
            phone_b = num if num in (q.mobile, q.landline) else None
        a = self._rec(p, ha, sa, phone=phone_a)
        b = self._rec(q, hb, sb, phone=phone_b)
        for f in post:
            f(b)
        return a, b, phen

    # -- nonmatch -------------------------------------------------------------

    def nonmatch(self, phen: str) -> tuple[dict, dict, str]:
        rng, pop = self.rng, self.pop
        ha, hb = self._two_hospitals()
        if phen == "common_name":
            k, r = rng.choice(pop.family_common)
            p = pop.person(rng, family=(k, r))
            q = pop.person(rng, family=(k, r), sex=p.sex)
            q.given, q.given_kana = p.given, p.given_kana
        elif phen == "namesake_same_dob":
            p = pop.person(rng)
            q = pop.person(rng, family=(p.family, p.family_kana), sex=p.sex, birth=p.birth)
            q.given, q.given_kana = p.given, p.given_kana
        elif phen in ("twins", "parent_child_same_given", "spouses", "siblings"):
            p, q = self._family_pair(phen)
        elif phen == "nursing_home":
            p, q = pop.nursing_home(rng, 2)
            if rng.random() < 0.3:  # a common family name in the same home
                q.family, q.family_kana = p.family, p.family_kana
        elif phen == "same_dob_block":
            p = pop.person(rng)
            q = pop.person(rng, birth=p.birth, sex=p.sex if rng.random() < 0.7 else None)
        elif phen == "same_kana_block":
            p = pop.person(rng)
            q = pop.person(rng, sex=p.sex)
            q.family_kana, q.given_kana = p.family_kana, p.given_kana
            # kanji of the same reading where the tables have one, else the same kanji
            alts = [k for k, r in pop.family.items if r == p.family_kana and k != p.family]
            q.family = rng.choice(alts) if alts and rng.random() < 0.6 else p.family
            galts = [k for k, r, _ in names.given_names(p.sex) if r == p.given_kana and k != p.given]
            q.given = rng.choice(galts) if galts and rng.random() < 0.6 else p.given
        else:
            raise ValueError(phen)
        return self._rec(p, ha), self._rec(q, hb), phen

    def _family_pair(self, phen: str) -> tuple[Person, Person]:
        rng, pop = self.rng, self.pop
        fam = pop.family_name(rng)
        addr = pop.address(rng)
        line = pop.landline(rng, addr.area) if rng.random() < 0.8 else None
        if phen == "twins":
            b = pop.birth(rng, 0, 80)
            p = pop.person(rng, birth=b, family=fam, address=addr, landline=line)
            sex = p.sex if rng.random() < 0.6 else ("F" if p.sex == "M" else "M")
            q = pop.person(rng, sex=sex, birth=b, family=fam, address=addr, landline=line,
                           insurance=pop.dependent_insurance(rng, p.insurance, p.age()))
            while q.given_kana == p.given_kana:
                q.given, q.given_kana = pop.given_name(rng, sex, b)
            if p.age() >= 30:  # grown-up twins: the same family name, often apart by now
                q.address = pop.address(rng)
                q.landline = None
                q.insurance = pop.insurance(rng, q.age())
            return p, q
        if phen == "parent_child_same_given":
            sex = rng.choice("MF")
            pb = pop.birth(rng, 50, 95)
            parent = pop.person(rng, sex=sex, birth=pb, family=fam, address=addr, landline=line)
            kb = pop.birth_for_age(rng, parent.age() - rng.randint(22, 38))
            child = pop.person(rng, sex=sex, birth=kb, family=fam, address=addr, landline=line,
                               insurance=pop.dependent_insurance(rng, parent.insurance, TODAY.year - kb.year))
            child.given, child.given_kana = parent.given, parent.given_kana
            return parent, child
        if phen == "spouses":
            pb = pop.birth(rng, 25, 95)
            p = pop.person(rng, sex="M", birth=pb, family=fam, address=addr, landline=line)
            qb = pop.birth_for_age(rng, max(20, p.age() + rng.randint(-6, 4)))
            q = pop.person(rng, sex="F", birth=qb, family=fam, address=addr, landline=line,
                           insurance=pop.dependent_insurance(rng, p.insurance, TODAY.year - qb.year))
            return (p, q) if rng.random() < 0.5 else (q, p)
        pb = pop.birth(rng, 0, 85)
        p = pop.person(rng, birth=pb, family=fam, address=addr, landline=line)
        qb = pop.birth_for_age(rng, max(0, p.age() + rng.choice([-1, 1]) * rng.randint(1, 8)))
        sex = p.sex if rng.random() < 0.5 else ("F" if p.sex == "M" else "M")
        q = pop.person(rng, sex=sex, birth=qb, family=fam, address=addr, landline=line,
                       insurance=replace(p.insurance, branch=f"{rng.randint(1, 6):02d}") if p.insurance and p.age() < 23 else None)
        while q.given_kana == p.given_kana:
            q.given, q.given_kana = pop.given_name(rng, sex, qb)
        if p.age() >= 25 and q.age() >= 25 and rng.random() < 0.6:
            q.address, q.landline = pop.address(rng), None  # grown-up siblings live apart
        return p, q


def make_pairs(seed: int, n: int) -> list[dict[str, Any]]:
    """`n` labelled pairs (JSON-ready), half `match`, half `nonmatch`, the phenomena of each
    class in turn, shuffled; pair ids say nothing about the label."""
    pm = PairMaker(seed)
    out = []
    n_match = n // 2
    for i in range(n):
        if i < n_match:
            a, b, phen = pm.match(MATCH_PHENOMENA[i % len(MATCH_PHENOMENA)])
            label = "match"
        else:
            a, b, phen = pm.nonmatch(NONMATCH_PHENOMENA[(i - n_match) % len(NONMATCH_PHENOMENA)])
            label = "nonmatch"
        if pm.rng.random() < 0.5:
            a, b = b, a
        out.append({"a": a, "b": b, "label": label, "phenomenon": phen})
    pm.rng.shuffle(out)
    for i, p in enumerate(out):
        p["pair_id"] = f"s{seed}-{i:05d}"
    return [{"pair_id": p["pair_id"], "a": p["a"], "b": p["b"], "label": p["label"], "phenomenon": p["phenomenon"]} for p in out]


def strip_none(r: dict[str, Any]) -> dict[str, Any]:
    """The record without its missing fields (as most exports write it)."""
    return {k: v for k, v in r.items() if v is not None}
