"""Site-reliability-engineering paraphrase pairs: the loss data and the test items of the ``embedding`` pairs.

Each *family* is one meaning ("the p99 latency of S rose to N ms") written several ways, with different words,
word order and number formats; a pair is two different wordings of one family with the same slot values (the
service, the host, the number), so its two sentences mean the same and differ in wording. Slot values make the
pairs of one family hard negatives of each other: a retrieval has to tell "checkout at 800 ms" from "payments at
800 ms". Every (family, slot values) occurs once, so each sentence has exactly one paraphrase in the data.

The data are drawn once with a seeded ``random.Random`` (the same pairs on every machine), shuffled, and split into
a *fit* part (``split="fit"``: for choosing anything that needs choosing, never for measuring) and a *held-out*
part (``split="test"``), which the loss and the scores use. Written for this project; no model here was trained on
it (the third-party fine-tune's own training data are not public).
"""

from __future__ import annotations

import random
from functools import lru_cache

from ..errors import InvalidParameterError

#: Bump when the generator changes: part of the key of every stored number measured on these pairs.
DATA_VERSION = 1
N_PAIRS = 384  # all pairs
N_FIT = 128  # the fit part; the other 256 are held out

SERVICES = [
    "checkout",
    "payments",
    "search",
    "login",
    "inventory",
    "notifications",
    "billing",
    "shipping",
    "recommendations",
    "user-profile",
    "api-gateway",
    "cart",
    "orders",
    "media-upload",
]
HOSTS = ["web-03", "web-12", "db-01", "cache-07", "worker-21", "edge-05", "batch-14", "ingest-09"]
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2", "us-west-2", "eu-central-1"]
DATABASES = ["Postgres", "MySQL", "Redis", "Cassandra", "MongoDB", "Elasticsearch"]
QUEUES = ["order-events", "email-jobs", "clickstream", "invoice-tasks", "audit-log"]
ALERTS = ["HighErrorRate", "DiskPressure", "PodCrashLooping", "LatencySLOBreach", "NodeNotReady"]
DOMAINS = ["shop.example.com", "api.example.com", "status.example.org", "auth.example.net"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight", 10: "ten"}

#: Slot name -> the values it takes (numbers are formatted by the wordings themselves).
SLOTS = {
    "svc": SERVICES,
    "host": HOSTS,
    "region": REGIONS,
    "db": DATABASES,
    "queue": QUEUES,
    "alert": ALERTS,
    "domain": DOMAINS,
    "day": DAYS,
    "dep": ["auth", "geo-lookup", "pricing", "ledger", "tax-rates"],
    "ms": [250, 400, 800, 1200, 2000, 3500],
    "pct": [80, 85, 90, 95, 98],
    "err": [1, 2, 5, 10, 20],
    "min": [5, 10, 15, 20, 30],
    "ver": ["v2.3.1", "v1.8.0", "v3.0.2", "v4.1.7", "v2.9.4"],
    "sev": [1, 2, 3],
    "days": [2, 3, 5, 10],
    "sec": [30, 45, 90, 120, 300],
    "n": [2, 3, 4, 5, 6, 8, 10],
    "k": [12, 40, 75, 150],
    "hour": [2, 4, 14, 22],
    "hours": [2, 4, 6, 8],
    "x": [2, 3, 4, 5],
}

#: Family -> its wordings. ``{n_word}`` is the number ``n`` in words, ``{x_word}`` likewise.
FAMILIES: dict[str, list[str]] = {
    "latency": [
        "p99 latency of the {svc} service jumped to {ms} ms",
        "the 99th percentile response time for {svc} rose sharply to {ms} milliseconds",
        "{svc} tail latency spiked: the slowest 1% of requests now take {ms}ms",
        "requests to {svc} got much slower, with p99 at {ms} milliseconds",
    ],
    "disk": [
        "disk usage on {host} is at {pct}%",
        "{host} has used {pct} percent of its disk space",
        "the filesystem on host {host} is {pct}% full",
        "{host} is running low on storage, {pct} percent of the volume is taken",
    ],
    "oom": [
        "{svc} pods are being OOMKilled",
        "the {svc} containers keep getting killed for exceeding their memory limit",
        "{svc} runs out of memory and Kubernetes restarts its pods",
        "out-of-memory kills keep hitting the {svc} workload",
    ],
    "cpu": [
        "CPU utilization on {host} has been above {pct}% for {min} minutes",
        "for the last {min} minutes {host} has been pegged at over {pct} percent CPU",
        "processor load on {host} stayed higher than {pct}% for {min} min",
        "{host} CPU usage exceeded {pct} percent over the past {min} minutes",
    ],
    "rollback": [
        "roll back {svc} to version {ver}",
        "revert the {svc} deployment to {ver}",
        "redeploy the previous release {ver} of {svc}",
        "undo the latest {svc} release by going back to {ver}",
    ],
    "deployed": [
        "version {ver} of {svc} was deployed to {region}",
        "{svc} {ver} is now rolled out in {region}",
        "we shipped release {ver} of {svc} to the {region} region",
        "the {region} rollout of {svc} {ver} has finished",
    ],
    "errors": [
        "the {svc} error rate is above {err}%",
        "more than {err} percent of {svc} requests are failing",
        "{svc} is returning errors on over {err}% of calls",
        "over {err} percent of calls to {svc} end in a server error",
    ],
    "page": [
        "page the on-call engineer for {svc}",
        "wake up whoever is on call for {svc}",
        "escalate to the {svc} on-call rotation",
        "notify the person holding the pager for {svc}",
    ],
    "budget": [
        "{svc} has used {pct}% of its monthly error budget",
        "{pct} percent of the {svc} error budget for this month is gone",
        "this month {svc} already burned through {pct}% of its SLO error budget",
        "only {rest}% of the monthly error budget of {svc} is left",
    ],
    "incident": [
        "declare a SEV{sev} incident for the {svc} outage",
        "open a severity {sev} incident because {svc} is down",
        "{svc} is down, start a sev-{sev} incident",
        "the {svc} outage needs a severity-{sev} incident declared",
    ],
    "cert": [
        "the TLS certificate for {domain} expires in {days} days",
        "{domain}'s SSL cert will expire {days} days from now",
        "in {days} days the HTTPS certificate of {domain} runs out",
        "{days} days are left before the {domain} certificate expires",
    ],
    "replication": [
        "replication lag on the {db} replica is {sec} seconds",
        "the {db} read replica is {sec} seconds behind the primary",
        "{db} replica trails its primary by {sec} s",
        "the {db} follower lags the leader by {sec} seconds",
    ],
    "pool": [
        "{svc} has exhausted its database connection pool",
        "no free DB connections are left in the {svc} pool",
        "{svc} cannot get a database connection because its pool is full",
        "all database connections of {svc} are in use",
    ],
    "scale": [
        "scale {svc} up to {n} replicas",
        "increase the number of {svc} instances to {n}",
        "run {n_word} copies of {svc}",
        "add capacity so that {svc} has {n} pods",
    ],
    "restart": [
        "restart the {svc} pods in {region}",
        "do a rolling restart of {svc} in {region}",
        "bounce the {svc} service in the {region} region",
        "cycle every {svc} instance running in {region}",
    ],
    "health": [
        "{host} is failing its health checks",
        "the load balancer marked {host} as unhealthy",
        "health probes against {host} keep failing",
        "{host} does not pass its health check any more",
    ],
    "backlog": [
        "the {queue} queue has a backlog of {k} thousand messages",
        "{k}k messages are waiting unprocessed in {queue}",
        "consumers of {queue} are behind by {k},000 messages",
        "{queue} has piled up about {k} thousand unconsumed events",
    ],
    "postmortem": [
        "write the postmortem for yesterday's {svc} outage",
        "draft the incident review of the {svc} outage from yesterday",
        "we owe a post-incident report on yesterday's {svc} downtime",
        "document what went wrong in the {svc} outage yesterday",
    ],
    "maintenance": [
        "{db} maintenance is scheduled for {day} at {hour}:00 UTC",
        "planned downtime for {db} on {day}, {hour}:00 UTC",
        "{db} will be taken offline for maintenance on {day} at {hour} o'clock UTC",
        "on {day} at {hour}:00 UTC the {db} cluster goes down for planned work",
    ],
    "dns": [
        "{svc} cannot resolve the hostname of {dep}",
        "DNS lookups for {dep} are failing from {svc}",
        "{svc} gets name resolution errors when calling {dep}",
        "the {dep} domain does not resolve inside {svc}",
    ],
    "traffic": [
        "traffic to {svc} grew {x}x in the last hour",
        "{svc} is seeing {x_word} times more requests than an hour ago",
        "{svc} request rate went up by a factor of {x} over the past hour",
        "in one hour the load on {svc} increased {x}-fold",
    ],
    "flapping": [
        "the {alert} alert of {svc} keeps flapping",
        "{alert} for {svc} fires and resolves over and over",
        "the {svc} {alert} alert is noisy, it toggles between firing and ok",
        "{svc}'s {alert} alert switches on and off repeatedly",
    ],
    "silence": [
        "silence the {alert} alert for {hours} hours",
        "mute {alert} for the next {hours} hours",
        "put a {hours}-hour silence on the {alert} alert",
        "suppress {alert} notifications for {hours} hours",
    ],
    "canary": [
        "the canary for {svc} {ver} shows elevated errors, halt the rollout",
        "stop deploying {svc} {ver}, the canary is erroring",
        "pause the {svc} {ver} rollout because the canary instances fail",
        "{svc} {ver} canary is unhealthy, so freeze the deployment",
    ],
}


def _slots(template: str) -> list[str]:
    import string

    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return sorted({"n" if f == "n_word" else "x" if f == "x_word" else "pct" if f == "rest" else f for f in names})


def _fill(template: str, values: dict) -> str:
    extra = {
        "n_word": NUMBER_WORDS.get(values.get("n"), values.get("n")),
        "x_word": NUMBER_WORDS.get(values.get("x"), values.get("x")),
        "rest": 100 - values["pct"] if "pct" in values else None,
    }
    return template.format(**values, **extra)


def _quotas(capacity: dict[str, int], total: int) -> dict[str, int]:
    """Pairs per family: as even as the families' numbers of distinct slot values allow (water-filling)."""
    quota, left = dict.fromkeys(capacity, 0), total
    while left:
        open_ = [f for f in sorted(capacity) if quota[f] < capacity[f]]
        if not open_:
            raise InvalidParameterError(f"the families hold only {total - left} distinct pairs, not {total}")
        for f in open_[:left]:
            quota[f] += 1
            left -= 1
    return quota


@lru_cache(maxsize=4)
def _all_pairs(seed: int) -> tuple[dict, ...]:
    """``N_PAIRS`` distinct pairs, shuffled: each a dict with ``a``, ``b``, ``family``, ``key``."""
    import itertools

    rng = random.Random(f"sre-paraphrases:{seed}")
    combos = {}
    for family, wordings in sorted(FAMILIES.items()):
        slots = _slots(wordings[0])
        combos[family] = [dict(zip(slots, v)) for v in itertools.product(*(SLOTS[s] for s in slots))]
    out = []
    for family, k in _quotas({f: len(c) for f, c in combos.items()}, N_PAIRS).items():
        wordings = FAMILIES[family]
        for values in rng.sample(combos[family], k):
            i, j = rng.sample(range(len(wordings)), 2)
            key = family + ":" + ",".join(f"{s}={v}" for s, v in values.items())
            out.append({"a": _fill(wordings[i], values), "b": _fill(wordings[j], values), "family": family, "key": key})
    rng.shuffle(out)
    return tuple(out)


def pairs(split: str = "test", *, n: int | None = None, seed: int = 0) -> list[dict]:
    """The first ``n`` pairs (all if None) of the ``"test"`` (held-out) or ``"fit"`` part: dicts with ``a`` and
    ``b`` (two wordings of one meaning), ``family`` and ``key`` (the meaning: family and slot values)."""
    everything = _all_pairs(seed)
    if split == "fit":
        part = everything[:N_FIT]
    elif split == "test":
        part = everything[N_FIT:]
    else:
        raise InvalidParameterError(f"split must be 'fit' or 'test', got {split!r}")
    if n is not None and not (isinstance(n, int) and n >= 1):
        raise InvalidParameterError(f"n must be a positive number of pairs, got {n!r}")
    return [dict(p) for p in part[:n]]
