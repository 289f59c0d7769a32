"""The committed gRPC stubs match the .proto sources (regenerate: python -m edgespec.protos.generate)."""

from edgespec.protos.generate import check


def test_generated_stubs_are_up_to_date() -> None:
    assert check() == [], "stale stubs: run `python -m edgespec.protos.generate`"
