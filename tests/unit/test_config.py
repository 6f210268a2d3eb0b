"""hpcrun.config: precedence, validation, errors and the marshal cache."""

import os

import pytest
import yaml

from hpcrun import config
from hpcrun.errors import CONFIG, ConfigError


@pytest.fixture
def site(tmp_path, monkeypatch):
    """Never read the real /etc/hpcrun: SITE points into tmp (absent until written)."""
    path = tmp_path / "etc" / "hpcrun.yaml"
    path.parent.mkdir()
    monkeypatch.setattr(config, "SITE", str(path))
    return path


@pytest.fixture
def env(tmp_path, site):
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    e = {"HOME": str(home), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return e


def user_file(env):
    path = os.path.join(env["XDG_CONFIG_HOME"], "hpcrun", "hpcrun.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def packaged():
    # the installed copy (sys.prefix/share/hpcrun) wins over the tree's conf/ when present
    with open(config.packaged_default(), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_packaged_default_only(env):
    cfg = config.load(env)
    assert cfg == packaged()
    assert set(cfg) == set(config.SCHEMA)
    assert all(isinstance(cfg[k], t) for k, t in config.SCHEMA.items())
    assert cfg["mounts"]["home"] is True
    assert cfg["tmpfs_size"] == "64m"


def test_config_files_order(env, site):
    files = config.config_files(env)
    assert files[0] == config.packaged_default()
    assert os.path.basename(files[0]) == "hpcrun.yaml" and os.path.isfile(files[0])
    assert files[1:] == [str(site), os.path.join(env["XDG_CONFIG_HOME"], "hpcrun", "hpcrun.yaml")]
    env["HPCRUN_CONFIG"] = "/x/y.yaml"
    assert config.config_files(env)[-1] == "/x/y.yaml"


def test_user_dir_defaults_to_home_dot_config(env):
    del env["XDG_CONFIG_HOME"]
    assert config.config_files(env)[2] == os.path.join(env["HOME"], ".config", "hpcrun", "hpcrun.yaml")


def test_precedence_packaged_site_user_env(env, site, tmp_path):
    write(site, "tmpfs_size: 1m\nfuse: never\ndefault_path: /site\n")
    cfg = config.load(env)
    assert (cfg["tmpfs_size"], cfg["fuse"], cfg["default_path"]) == ("1m", "never", "/site")
    write(user_file(env), "tmpfs_size: 2m\nfuse: auto\n")
    cfg = config.load(env)
    assert (cfg["tmpfs_size"], cfg["fuse"], cfg["default_path"]) == ("2m", "auto", "/site")
    env["HPCRUN_CONFIG"] = write(tmp_path / "over.yaml", "tmpfs_size: 3m\n")
    cfg = config.load(env)
    assert (cfg["tmpfs_size"], cfg["fuse"], cfg["default_path"]) == ("3m", "auto", "/site")
    # untouched keys keep the packaged values
    assert cfg["squashfuse"] == packaged()["squashfuse"]


def test_lists_replace(env, site):
    write(site, "scratch: [/site-scratch]\n")
    assert config.load(env)["scratch"] == ["/site-scratch"]


def test_mounts_map_merges_key_by_key(env, site, tmp_path):
    write(site, "mounts:\n  home: false\n")
    write(user_file(env), "mounts:\n  tmp: false\n")
    env["HPCRUN_CONFIG"] = write(tmp_path / "o.yaml", "mounts:\n  home: true\n  proc: false\n")
    m = config.load(env)["mounts"]
    assert m["home"] is True  # site said false, HPCRUN_CONFIG said true
    assert m["tmp"] is False  # from the user file
    assert m["proc"] is False
    assert m["sys"] is True and m["cwd"] is True and m["scratch"] is True  # packaged
    assert set(m) == set(packaged()["mounts"])


def test_empty_file_is_fine(env, site):
    write(site, "# only a comment\n")
    assert config.load(env) == packaged()


def test_unknown_key_names_file(env):
    path = write(user_file(env), "tmpfs_sise: 1m\n")
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert path in ei.value.message
    assert "tmpfs_sise" in ei.value.message
    assert "tmpfs_size" in ei.value.hint
    assert ei.value.code == CONFIG


def test_unknown_nested_mount_key(env, site):
    write(site, "mounts:\n  homes: false\n")
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert str(site) in ei.value.message and "mounts.homes" in ei.value.message


@pytest.mark.parametrize(
    "text,what",
    [
        ("scratch: /scratch\n", "list"),
        ("fuse: [auto]\n", "str"),
        ("mounts: [home]\n", "dict"),
        ("cleanenv_keep: TERM\n", "list"),
        ("tmpfs_size: 64\n", "str"),
    ],
)
def test_wrong_type(env, site, text, what):
    write(site, text)
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert str(site) in ei.value.message
    assert f"must be a {what}" in ei.value.message


def test_mount_value_must_be_bool(env, site):
    write(site, "mounts:\n  home: 'no'\n")
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert "mounts.home" in ei.value.message and "true or false" in ei.value.message


def test_top_level_not_a_mapping(env, site):
    write(site, "- a\n- b\n")
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert str(site) in ei.value.message and "mapping" in ei.value.message


def test_malformed_yaml_names_file_and_line(env):
    path = write(user_file(env), "fuse: auto\ntmpfs_size: 1m\nmounts: [home\nscratch: []\n")
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    msg = ei.value.message
    assert msg.startswith(path + ":")
    assert "malformed YAML" in msg
    assert " line 4 " in msg


def test_malformed_yaml_line_is_exact(env, tmp_path):
    # a tab is not allowed as indentation: the error is on line 3 exactly
    env["HPCRUN_CONFIG"] = path = write(tmp_path / "bad.yaml", "fuse: auto\nmounts:\n\thome: true\n")
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert path in ei.value.message
    assert " line 3 " in ei.value.message


def test_hpcrun_config_missing_file(env, tmp_path):
    env["HPCRUN_CONFIG"] = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert "HPCRUN_CONFIG" in ei.value.message and "nope.yaml" in ei.value.message


def test_missing_site_and_user_files_are_fine(env, site):
    assert not site.exists()
    assert config.load(env)["fuse"] == "auto"


def test_unreadable_config_is_config_error(env, site):
    site.mkdir()  # a directory where the file should be
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert str(site) in ei.value.message


def test_cache_written_and_used_on_second_load(env, site, monkeypatch):
    write(site, "tmpfs_size: 5m\n")
    first = config.load(env)
    cache = os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "config.marshal")
    assert os.path.isfile(cache)

    def boom(path):
        raise AssertionError(f"parsed {path} although the cache is valid")

    monkeypatch.setattr(config, "parse_file", boom)
    assert config.load(env) == first
    assert config.load(env)["tmpfs_size"] == "5m"


def test_cache_invalidated_when_a_file_changes(env, site, monkeypatch):
    write(site, "tmpfs_size: 5m\n")
    assert config.load(env)["tmpfs_size"] == "5m"
    write(site, "tmpfs_size: 123m\n")  # new content and new size
    calls = []
    real = config.parse_file
    monkeypatch.setattr(config, "parse_file", lambda p: calls.append(p) or real(p))
    assert config.load(env)["tmpfs_size"] == "123m"
    assert str(site) in calls
    calls.clear()
    assert config.load(env)["tmpfs_size"] == "123m"
    assert calls == []  # cached again


def test_cache_invalidated_when_a_file_appears(env, site):
    assert config.load(env)["tmpfs_size"] == "64m"
    write(user_file(env), "tmpfs_size: 7m\n")
    assert config.load(env)["tmpfs_size"] == "7m"


def test_cache_invalidated_when_hpcrun_config_set(env, tmp_path):
    assert config.load(env)["fuse"] == "auto"
    env["HPCRUN_CONFIG"] = write(tmp_path / "o.yaml", "fuse: never\n")
    assert config.load(env)["fuse"] == "never"
    del env["HPCRUN_CONFIG"]
    assert config.load(env)["fuse"] == "auto"


def test_corrupt_cache_is_ignored(env, site):
    write(site, "tmpfs_size: 9m\n")
    cache = os.path.join(env["XDG_CACHE_HOME"], "hpcrun", "config.marshal")
    os.makedirs(os.path.dirname(cache))
    write(cache, "garbage that is not marshal")
    assert config.load(env)["tmpfs_size"] == "9m"


def test_cache_under_home_when_no_xdg_cache(env):
    del env["XDG_CACHE_HOME"]
    config.load(env)
    assert os.path.isfile(os.path.join(env["HOME"], ".cache", "hpcrun", "config.marshal"))


def test_unwritable_cache_dir_still_loads(env, tmp_path):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    env["XDG_CACHE_HOME"] = str(blocker)  # a file: the cache directory cannot be made
    assert config.load(env)["fuse"] == "auto"


def test_errors_are_not_cached(env, site):
    write(site, "bogus: 1\n")
    with pytest.raises(ConfigError):
        config.load(env)
    with pytest.raises(ConfigError):
        config.load(env)


@pytest.mark.parametrize(
    "text,what",
    [
        ("share: sometimes\n", "one of auto, always, never"),
        ("share_idle_timeout: -1\n", ">= 0"),
        ("share_idle_timeout: '5'\n", "must be a int"),
    ],
)
def test_share_keys_are_checked(env, site, text, what):
    write(site, text)
    with pytest.raises(ConfigError) as ei:
        config.load(env)
    assert str(site) in ei.value.message and what in ei.value.message


def test_alternating_hpcrun_config_files_keep_their_own_caches(env, tmp_path, monkeypatch):
    a = write(tmp_path / "a.yaml", "tmpfs_size: 1m\n")
    b = write(tmp_path / "b.yaml", "tmpfs_size: 2m\n")
    for path in (a, b, None):
        env.pop("HPCRUN_CONFIG", None)
        if path:
            env["HPCRUN_CONFIG"] = path
        config.load(env)
    monkeypatch.setattr(config, "parse_file", lambda p: (_ for _ in ()).throw(AssertionError(f"parsed {p}")))
    for path, size in ((a, "1m"), (b, "2m"), (None, "64m")):
        env.pop("HPCRUN_CONFIG", None)
        if path:
            env["HPCRUN_CONFIG"] = path
        assert config.load(env)["tmpfs_size"] == size  # all from their caches
