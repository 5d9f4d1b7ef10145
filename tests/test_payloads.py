"""Notification payloads: hypothesis feeds the parsers anything at all."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from listener.listen import BatchFinished, parse_finished, parse_work

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(st.one_of(st.text(), st.binary(), st.integers(), st.none(), JSON))
def test_any_work_payload_is_a_batch_id_or_nothing(payload: Any) -> None:
    parsed = parse_work(payload)

    assert parsed is None or (
        isinstance(payload, str) and str(parsed) == payload.lower()
    )


@given(st.uuids())
def test_a_batch_id_payload_is_understood(batch_id: uuid.UUID) -> None:
    assert parse_work(str(batch_id)) == batch_id
    assert parse_work(str(batch_id).upper()) == batch_id


@given(
    st.uuids()
    .map(str)
    .flatmap(
        lambda s: st.sampled_from(
            [f"{{{s}}}", f"urn:uuid:{s}", f" {s}", s.replace("-", "")]
        )
    )
)
def test_other_spellings_of_a_uuid_are_refused(payload: str) -> None:
    assert parse_work(payload) is None


@given(st.one_of(st.text(), JSON.map(lambda v: orjson.dumps(v).decode())))
def test_any_finished_payload_parses_or_is_refused(payload: str) -> None:
    parsed = parse_finished(payload)

    assert parsed is None or isinstance(parsed, BatchFinished)


@given(
    batch_id=st.uuids(),
    status=st.text(max_size=20),
    counts=st.tuples(*[st.integers(-(2**63), 2**63 - 1)] * 3),
    extra=st.dictionaries(st.text(max_size=8), JSON, max_size=3),
)
def test_a_finished_payload_round_trips(
    batch_id: uuid.UUID,
    status: str,
    counts: tuple[int, int, int],
    extra: dict[str, Any],
) -> None:
    keys = ("total_documents", "completed_count", "failed_count")
    payload = (
        extra
        | {"batch_id": str(batch_id), "status": status}
        | dict(zip(keys, counts, strict=True))
    )

    parsed = parse_finished(orjson.dumps(payload).decode())

    assert parsed == BatchFinished(batch_id, status, *counts)


@given(
    counts=st.tuples(
        st.one_of(st.floats(), st.text(max_size=3), st.booleans(), st.none()),
    )
)
def test_a_count_that_is_not_an_integer_is_refused(counts: tuple[Any]) -> None:
    payload = {
        "batch_id": str(uuid.uuid4()),
        "status": "completed",
        "completed_count": counts[0],
    }

    assert parse_finished(orjson.dumps(payload).decode()) is None


@given(
    st.integers(min_value=2**64).map(str) | st.sampled_from(["1e400", "-1e400", "NaN"])
)
def test_numbers_json_cannot_hold_are_refused_not_raised(number: str) -> None:
    payload = (
        f'{{"batch_id": "{uuid.uuid4()}", "status": "completed",'
        f' "total_documents": {number}}}'
    )

    assert parse_finished(payload) is None
