import pytest

from medmllm.errors import ConfigError
from medmllm.registry import Registry


def test_register_and_get_exact_name():
    reg = Registry("widget")
    reg.register("a", 1)

    @reg.register("b")
    def b():
        return 2

    assert reg.get("a") == 1
    assert reg.get("b") is b
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "A" not in reg


def test_unknown_name_lists_known_ones():
    reg = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(ConfigError, match=r"unknown widget 'alph'; known: alpha"):
        reg.get("alph")


def test_duplicate_name_fails_loudly():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ConfigError, match="duplicate widget name 'a'"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_empty_name_refused():
    with pytest.raises(ConfigError):
        Registry("widget").register("", 1)
