"""Split a data set's rows over federated clients: IID, Dirichlet over labels, or by a natural id.

Pure functions of row indices, labels or ids and a seed; each returns one list of row indices
per client. Every row goes to exactly one client and every client gets at least one row.

* ``iid``: a seeded shuffle dealt into near-equal parts (sizes differ by at most one).
* ``dirichlet:ALPHA``: for each label, the shares of the clients are drawn from
  Dirichlet(ALPHA, ..., ALPHA) and that label's rows are cut accordingly (Hsu et al. 2019,
  https://arxiv.org/abs/1909.06335). Small ALPHA (0.1) gives each client few labels; large ALPHA
  (100) approaches IID.
* ``by:FIELD``: the rows of one value of FIELD (a user, an author, a hospital) stay together, as
  real federations are split; values go to clients largest first, each to the smallest client so
  far, which balances sizes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

_SPEC = re.compile(r"^(iid|dirichlet:(?P<alpha>[0-9.eE+-]+)|by:(?P<field>\w+))$")
_DIRICHLET_TRIES = 100


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed ``--partition`` value."""

    kind: str
    """"iid", "dirichlet" or "by"."""
    alpha: float | None = None
    """Dirichlet concentration (kind "dirichlet")."""
    field: str | None = None
    """The row field whose values keep rows together (kind "by")."""

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        return f"by:{self.field}" if self.kind == "by" else self.kind


def parse_partition(text: str) -> PartitionSpec:
    """``"iid"``, ``"dirichlet:0.5"`` or ``"by:user"`` → :class:`PartitionSpec`."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise ValueError(f"--partition {text!r} is not a partition; use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) "
                         f"or by:FIELD (rows with the same FIELD value stay on one client)")
    if match["alpha"] is not None:
        alpha = float(match["alpha"])
        if not alpha > 0:
            raise ValueError(f"--partition {text!r}: the Dirichlet concentration must be > 0 (e.g. dirichlet:0.5)")
        return PartitionSpec("dirichlet", alpha=alpha)
    if match["field"] is not None:
        return PartitionSpec("by", field=match["field"])
    return PartitionSpec("iid")


def _check_clients(n_rows: int, clients: int) -> None:
    if not isinstance(clients, int) or clients < 1:
        raise ValueError(f"the number of clients must be an integer >= 1, got {clients!r}")
    if n_rows < clients:
        raise ValueError(f"{n_rows} rows cannot give each of {clients} clients a row; use at most {n_rows} clients")


def iid(n_rows: int, clients: int, seed: int = 0) -> list[list[int]]:
    """Shuffle ``range(n_rows)`` and deal it into ``clients`` parts of near-equal size."""
    _check_clients(n_rows, clients)
    order = np.random.default_rng(seed).permutation(n_rows)
    return [sorted(part.tolist()) for part in np.array_split(order, clients)]


def dirichlet(labels: Sequence[Hashable], clients: int, alpha: float, seed: int = 0) -> list[list[int]]:
    """Label-skewed parts: label k's rows are cut by shares p_k ~ Dirichlet(alpha · 1_clients).

    A draw that leaves a client empty is redrawn (the next draw of the same seeded generator), so
    the result is still a function of the seed; after 100 empty-client draws the call fails and
    names a larger alpha or fewer clients.
    """
    _check_clients(len(labels), clients)
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    by_label: dict[Hashable, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in sorted(by_label, key=str):
            rows = rng.permutation(by_label[label])
            shares = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).round().astype(int)
            for part, chunk in zip(parts, np.split(rows, cuts)):
                part.extend(chunk.tolist())
        if all(parts):
            return [sorted(p) for p in parts]
    raise ValueError(f"dirichlet:{alpha:g} left a client without rows in {_DIRICHLET_TRIES} draws ({len(labels)} rows, "
                     f"{len(by_label)} labels, {clients} clients); use a larger alpha or fewer clients")


def by_group(groups: Sequence[Hashable], clients: int) -> list[list[int]]:
    """Rows sharing a group value stay together; groups go largest first to the smallest client."""
    _check_clients(len(groups), clients)
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < clients:
        raise ValueError(f"the rows have {len(members)} distinct values of the partition field, fewer than the "
                         f"{clients} clients; use at most {len(members)} clients, or --partition iid")
    parts: list[list[int]] = [[] for _ in range(clients)]
    for g in sorted(members, key=lambda g: (-len(members[g]), str(g))):
        min(parts, key=len).extend(members[g])  # ties: the lowest client index
    return [sorted(p) for p in parts]


def split(spec: PartitionSpec, rows: Sequence[dict], clients: int, seed: int = 0,
          labels: Sequence[Hashable] | None = None) -> list[list[int]]:
    """Row indices per client for ``spec``. ``labels`` (one per row) are needed by "dirichlet";
    "by:FIELD" reads FIELD from the raw ``rows``."""
    if spec.kind == "iid":
        return iid(len(rows), clients, seed)
    if spec.kind == "dirichlet":
        if labels is None:
            raise ValueError(f"--partition {spec} splits by label, and these rows have no classification labels; "
                             f"use iid or by:FIELD")
        return dirichlet(labels, clients, spec.alpha, seed)
    missing = [i for i, row in enumerate(rows) if spec.field not in row]
    if missing:
        raise ValueError(f"--partition {spec}: row {missing[0] + 1} has no field {spec.field!r} (fields: "
                         f"{sorted(rows[missing[0]])}); name a field every row has")
    return by_group([row[spec.field] for row in rows], clients)


def describe(parts: Sequence[Sequence[int]], labels: Sequence[Hashable] | None = None) -> list[str]:
    """One line per client: its size, and with labels its label counts, most common first."""
    lines = []
    for c, part in enumerate(parts):
        line = f"client {c}: {len(part):,} rows"
        if labels is not None:
            counts = Counter(labels[i] for i in part).most_common()
            line += " (" + ", ".join(f"{label}: {n}" for label, n in counts) + ")"
        lines.append(line)
    return lines
