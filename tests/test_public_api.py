import secateurs


def test_every_public_name_resolves():
    for name in secateurs.__all__:
        assert getattr(secateurs, name) is not None, name


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        secateurs.no_such_thing  # noqa: B018
