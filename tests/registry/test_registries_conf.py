"""registries.conf: search lists, aliases, mirrors, insecure, blocked, drop-ins."""

import pytest

from stargz_overlay.errors import ConfigError, InvalidReference, RegistryError
from stargz_overlay.reference import parse_reference
from stargz_overlay.registries_conf import RegistriesConf

D = "sha256:" + "cd" * 32

CONF = """
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"

[aliases]
"myapp" = "quay.io/team/myapp"

[[registry]]
prefix = "docker.io"
location = "docker.io"
[[registry.mirror]]
location = "mirror.local:5001"
insecure = true
[[registry.mirror]]
location = "pinned.local/cache"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "docker.io/evil"
blocked = true

[[registry]]
location = "127.0.0.1:5000"
insecure = true

[[registry]]
prefix = "*.corp.example"
insecure = true
"""


def srcs(conf, text):
    return [(str(s.reference), s.insecure, s.mirror)
            for s in conf.sources(parse_reference(text))]


def test_mirrors_in_order_then_primary():
    conf = RegistriesConf.from_text(CONF)
    assert srcs(conf, "docker.io/library/alpine:3") == [
        ("mirror.local:5001/library/alpine:3", True, True),
        ("docker.io/library/alpine:3", False, False)]
    assert srcs(conf, "docker.io/library/alpine@" + D) == [
        ("mirror.local:5001/library/alpine@" + D, True, True),
        ("pinned.local/cache/library/alpine@" + D, False, True),
        ("docker.io/library/alpine@" + D, False, False)]


def test_blocked_longest_prefix():
    conf = RegistriesConf.from_text(CONF)
    with pytest.raises(RegistryError, match="blocked"):
        conf.sources(parse_reference("docker.io/evil/app"))
    # "docker.io/evilcorp" does not match the prefix "docker.io/evil"
    assert len(conf.sources(parse_reference("docker.io/evilcorp/app"))) == 2


def test_insecure_and_wildcard():
    conf = RegistriesConf.from_text(CONF)
    assert conf.is_insecure("127.0.0.1:5000")
    assert not conf.is_insecure("127.0.0.1:5001")
    assert conf.is_insecure("reg.corp.example")
    assert srcs(conf, "reg.corp.example/a:1") == [("reg.corp.example/a:1", True, False)]


def test_short_names():
    conf = RegistriesConf.from_text(CONF)
    assert [str(r) for r in conf.candidates(parse_reference("alpine"))] == \
        ["docker.io/library/alpine:latest"]
    assert [str(r) for r in conf.candidates(parse_reference("myapp:2"))] == \
        ["quay.io/team/myapp:2"]
    empty = RegistriesConf.from_text("")
    with pytest.raises(InvalidReference, match="no unqualified-search"):
        empty.candidates(parse_reference("alpine"))
    two = RegistriesConf.from_text('unqualified-search-registries = ["a.io", "b.io"]')
    with pytest.raises(InvalidReference, match="ambiguous"):
        two.candidates(parse_reference("alpine"))
    two.short_name_mode = "permissive"
    assert [r.registry for r in two.candidates(parse_reference("alpine"))] == ["a.io", "b.io"]


def test_dropins_override(tmp_path):
    main = tmp_path / "registries.conf"
    main.write_text(CONF)
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "10-a.conf").write_text('unqualified-search-registries = ["quay.io"]\n'
                                 '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n')
    (d / "20-b.conf").write_text('[aliases]\n"x" = "quay.io/x/x"\n')
    (d / "ignored.txt").write_text("not toml [[[")
    conf = RegistriesConf.load(str(main), str(d))
    assert conf.search == ["quay.io"]
    assert srcs(conf, "docker.io/library/a:1") == [("docker.io/library/a:1", False, False)]
    assert conf.aliases["x"] == "quay.io/x/x" and conf.aliases["myapp"]
    assert conf.files == [str(main), str(d / "10-a.conf"), str(d / "20-b.conf")]


def test_v1_format():
    conf = RegistriesConf.from_text('[registries.search]\nregistries = ["a.io"]\n'
                                    '[registries.insecure]\nregistries = ["b.io:5000"]\n'
                                    '[registries.block]\nregistries = ["c.io"]\n')
    assert conf.search == ["a.io"]
    assert conf.is_insecure("b.io:5000")
    with pytest.raises(RegistryError, match="blocked"):
        conf.sources(parse_reference("c.io/x"))


@pytest.mark.parametrize("text, message", [
    ("[[registry]\n", "invalid TOML"),
    ('[[registry]]\nlocation = "https://x.io"\n', "scheme"),
    ('[[registry]]\ninsecure = "yes"\nlocation = "x.io"\n', "true or false"),
    ('unqualified-search-registries = "x"\n', "list of strings"),
    ('[registries.search]\nregistries = []\n[[registry]]\nlocation="a"\n', "mixes"),
    ('[[registry]]\nlocation = "x.io"\n[[registry.mirror]]\npull-from-mirror = "sometimes"\n'
     'location = "m.io"\n', "pull-from-mirror"),
])
def test_invalid(text, message):
    with pytest.raises(ConfigError, match=message):
        RegistriesConf.from_text(text)
