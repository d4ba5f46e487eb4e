"""Deterministic generator of the raw clickstream NDJSON dataset used as the demo input.

Same arguments give byte-identical files; duplicate, invalid and null counts are exact and scale
with ``records`` from the default 145,231-record dataset (5,234 / 876 / 2,145).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

BASE_RECORDS = 145_231
BASE_DUPLICATES = 5_234
BASE_INVALID = 876
BASE_NULLS = 2_145

# 6 event types + 24 hours + 1,121 pages + 83 device/country pairs = 1,234 gold rows at the
# default size; 83 = 3x20 real pairs + 20 ('unknown', c) + 3 (d, 'ZZ'), since a record never
# has both device and country null.
N_PAGES = 1_121
N_USERS = 20_000
SESSIONS_PER_USER = 8

EVENT_TYPES = ("page_view", "click", "add_to_cart", "checkout", "purchase", "search")
EVENT_WEIGHTS = (45, 25, 10, 5, 4, 11)
REFERRERS = ("google", "newsletter", "twitter", "partner", "bing", "facebook")
DEVICES = ("desktop", "mobile", "tablet")
COUNTRIES = (
    "US", "GB", "DE", "FR", "ES", "IT", "NL", "SE", "PL", "BR",
    "MX", "CA", "AU", "JP", "IN", "CN", "KR", "ZA", "NG", "AR",
)  # fmt: skip
FILLABLE = ("referrer", "device", "country", "duration_ms")
INVALID_KINDS = 6

_MS_PER_DAY = 86_400_000
_MS_PER_HOUR = 3_600_000
_MASK64 = (1 << 64) - 1
# Flat lookup table so a weighted pick costs one random() call instead of rng.choices().
_EVENT_TABLE = tuple(t for t, w in zip(EVENT_TYPES, EVENT_WEIGHTS, strict=True) for _ in range(w))
_encode = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True)
class GeneratedDataset:
    directory: Path
    files: list[Path]
    records: int
    duplicates: int
    invalid: int
    nulls: int
    retained: int


def scale_count(records: int, base: int) -> int:
    return round(records * base / BASE_RECORDS)


def mix_event_id(index: int, salt: int) -> str:
    # Every step is a bijection on 64-bit ints, so ids are unique without a seen-set.
    x = (index + salt) & _MASK64
    x = (x * 0x9E3779B97F4A7C15) & _MASK64
    x ^= x >> 32
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 29
    return f"evt-{x:016x}"


def format_ts(day: str, ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    minutes, sec = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{day}T{hour:02d}:{minute:02d}:{sec:02d}.{millis:03d}Z"


class _RecordFactory:
    """Builds one record dict per unique event; shared state keeps the warm-up round-robin."""

    def __init__(self, rng: random.Random, partition_date: date, warmup: int) -> None:
        self.rng = rng
        self.random = rng.random
        self.day = partition_date.isoformat()
        self.prev_day = (partition_date - timedelta(days=1)).isoformat()
        self.warmup = warmup
        self.salt = rng.getrandbits(64)
        self.pairs = [(d, c) for d in DEVICES for c in COUNTRIES]

    def build_base(self, index: int) -> dict[str, object]:
        rnd = self.random
        user = int(rnd() * N_USERS)
        if index < self.warmup:
            # Guarantees every page, hour, event type and device/country pair is retained.
            event_type = EVENT_TYPES[index % len(EVENT_TYPES)]
            page = index % N_PAGES
            ms = (index % 24) * _MS_PER_HOUR + int(rnd() * _MS_PER_HOUR)
            device, country = self.pairs[index % len(self.pairs)]
        else:
            event_type = _EVENT_TABLE[int(rnd() * len(_EVENT_TABLE))]
            page = int(rnd() * N_PAGES)
            ms = int(rnd() * _MS_PER_DAY)
            device = DEVICES[int(rnd() * len(DEVICES))]
            country = COUNTRIES[int(rnd() * len(COUNTRIES))]
        return {
            "event_id": mix_event_id(index, self.salt),
            "user_id": f"u{user:06d}",
            "session_id": f"s{user * SESSIONS_PER_USER + int(rnd() * SESSIONS_PER_USER):07d}",
            "event_type": event_type,
            "page_url": f"/p/{page:04d}",
            "referrer": REFERRERS[int(rnd() * len(REFERRERS))],
            "device": device,
            "country": country,
            "event_ts": format_ts(self.day, ms),
            "duration_ms": int(rnd() * 60_000),
        }

    def break_record(self, record: dict[str, object], kind: int) -> None:
        if kind == 0:
            record["user_id"] = None
        elif kind == 1:
            record["event_id"] = None
        elif kind == 2:
            record["event_type"] = "unknown_event"
        elif kind == 3:
            record["event_ts"] = "not-a-timestamp"
        elif kind == 4:
            record["event_ts"] = format_ts(self.prev_day, int(self.random() * _MS_PER_DAY))
        else:
            record["duration_ms"] = -1 - int(self.random() * 999)

    def blank_cell(self, record: dict[str, object], nth: int) -> None:
        column = FILLABLE[nth % len(FILLABLE)]
        # Cycle the surviving column so every ('unknown', c) and (d, 'ZZ') pair shows up.
        if column == "device":
            record["country"] = COUNTRIES[(nth // len(FILLABLE)) % len(COUNTRIES)]
        elif column == "country":
            record["device"] = DEVICES[(nth // len(FILLABLE)) % len(DEVICES)]
        if self.random() < 0.5:
            del record[column]
        else:
            record[column] = None


def split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def generate_clickstream(
    directory: Path,
    *,
    records: int = BASE_RECORDS,
    files: int = 25,
    seed: int = 42,
    partition_date: date = date(2026, 1, 6),
) -> GeneratedDataset:
    if records < 0 or files < 1:
        raise ValueError("records must be >= 0 and files >= 1")
    duplicates = scale_count(records, BASE_DUPLICATES)
    invalid = scale_count(records, BASE_INVALID)
    nulls = scale_count(records, BASE_NULLS)
    unique = records - duplicates
    clean = unique - invalid - nulls
    if clean < duplicates:
        raise ValueError(f"records={records} is too small to place {duplicates} duplicates")

    rng = random.Random(seed)
    rnd = rng.random
    factory = _RecordFactory(rng, partition_date, warmup=min(N_PAGES, clean))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"events-{i + 1:03d}.ndjson" for i in range(files)]

    # Sequential selection sampling: each remaining slot is drawn with probability
    # left/remaining, which yields exact totals while streaming.
    invalid_left, nulls_left = invalid, nulls
    clean_left, dups_left = clean, duplicates
    invalid_seen = nulls_seen = 0
    index = 0
    pending: list[str] = []
    for file_no, (path, count) in enumerate(zip(paths, split_evenly(unique, files), strict=True)):
        # Copies of the previous file's records go into this one; events-001 gets the last file's
        # copies appended after everything else is written.
        inbound = pending if file_no > 0 else []
        pending = []
        slots = count + len(inbound)
        insert_at = set(rng.sample(range(slots), len(inbound))) if inbound else set()
        inbound_iter = iter(inbound)
        with path.open("w", encoding="utf-8", newline="\n", buffering=1 << 20) as out:
            write = out.write
            for slot in range(slots):
                if slot in insert_at:
                    write(next(inbound_iter))
                    continue
                record = factory.build_base(index)
                remaining = unique - index
                # Warm-up records always land in the clean branch.
                pick = remaining if index < factory.warmup else rnd() * remaining
                index += 1
                if pick < invalid_left:
                    factory.break_record(record, invalid_seen % INVALID_KINDS)
                    invalid_seen += 1
                    invalid_left -= 1
                    write(_encode(record) + "\n")
                elif pick < invalid_left + nulls_left:
                    factory.blank_cell(record, nulls_seen)
                    nulls_seen += 1
                    nulls_left -= 1
                    write(_encode(record) + "\n")
                else:
                    line = _encode(record) + "\n"
                    if rnd() * clean_left < dups_left:
                        pending.append(line)
                        dups_left -= 1
                    clean_left -= 1
                    write(line)
    if pending:
        with paths[0].open("a", encoding="utf-8", newline="\n") as out:
            out.writelines(pending)

    return GeneratedDataset(
        directory=directory,
        files=paths,
        records=records,
        duplicates=duplicates,
        invalid=invalid,
        nulls=nulls,
        retained=records - duplicates - invalid,
    )
