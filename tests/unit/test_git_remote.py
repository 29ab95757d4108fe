"""Pull mode's remote (reconciler/adapters/git_remote.py) without a server: the URL loses
its userinfo, credentials go into the git process's environment only (after any
GIT_CONFIG_* already there), the helper answers `get` and nothing else, a token file is
read again at each fetch. The real remote is in tests/integration/test_pull_credentials.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.adapters.git_remote import (
    DEFAULT_USERNAME,
    GitCredentials,
    RemoteClone,
    RemoteUnavailable,
    split_url,
)


@pytest.mark.parametrize(("url", "clean", "user", "password"), [
    ("https://bot:s3cret@git.example.com/r.git", "https://git.example.com/r.git", "bot",
     "s3cret"),
    ("https://ghp_abc@github.com/o/r", "https://github.com/o/r", "ghp_abc", ""),
    ("http://u:p%40ss%3Aw@127.0.0.1:8080/r", "http://127.0.0.1:8080/r", "u", "p@ss:w"),
    ("https://u:p@[::1]:8443/r", "https://[::1]:8443/r", "u", "p"),
    ("https://git.example.com/r.git", "https://git.example.com/r.git", None, None),
    ("git@github.com:o/r.git", "git@github.com:o/r.git", None, None),
    ("ssh://git:pw@host/r.git", "ssh://git@host/r.git", None, None),
    ("/srv/repos/r.git", "/srv/repos/r.git", None, None),
])
def test_the_url_loses_its_userinfo(url: str, clean: str, user: str | None,
                                    password: str | None) -> None:
    shown, credentials = split_url(url)
    assert shown == clean
    if user is None:
        assert credentials is None
    else:
        assert credentials == GitCredentials(user, password or "")
        assert "password" not in repr(credentials)  # never printed


def test_credentials_come_from_the_token_then_the_file_then_the_url(tmp_path: Path) -> None:
    url = "https://bot:from-url@h/r"
    assert RemoteClone(url, tmp_path).credentials() == GitCredentials("bot", "from-url")
    assert RemoteClone(url, tmp_path, token="env-token").credentials() == GitCredentials(
        "bot", "env-token")
    token_file = tmp_path / "token"
    token_file.write_text("file-token-1\n")
    remote = RemoteClone("https://h/r", tmp_path, token_file=str(token_file),
                         username="ci")
    assert remote.credentials() == GitCredentials("ci", "file-token-1")
    token_file.write_text("file-token-2\n")  # rotated: read again at the next fetch
    assert remote.credentials() == GitCredentials("ci", "file-token-2")
    assert remote.redact("echo file-token-1 and file-token-2") == "echo *** and ***"
    assert RemoteClone("https://h/r", tmp_path, token="t0ken-xyz").credentials() == (
        GitCredentials(DEFAULT_USERNAME, "t0ken-xyz"))
    assert RemoteClone("https://h/r", tmp_path).credentials() is None


@pytest.mark.parametrize("content", [b"", b"\n", b"\xff\xfe", b"x" * 70000])
def test_a_bad_token_file_is_one_line_without_its_content(tmp_path: Path,
                                                          content: bytes) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    with pytest.raises(RemoteUnavailable, match="git token file") as info:
        RemoteClone("https://h/r", tmp_path, token_file=str(token_file)).credentials()
    assert "\n" not in str(info.value)
    assert "xxxx" not in str(info.value)


def test_the_environment_holds_the_helper_after_any_config_already_there(
        tmp_path: Path) -> None:
    environ = {"PATH": "/usr/bin:/bin", "GIT_CONFIG_COUNT": "1",
               "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "/srv"}
    remote = RemoteClone("https://bot:s3cret-token@git.example.com:8443/r.git", tmp_path,
                         environ=environ)
    env = remote._environment(remote.credentials())
    assert env["GIT_CONFIG_KEY_0"] == "safe.directory"  # kept
    keys = {env[f"GIT_CONFIG_KEY_{n}"]: env[f"GIT_CONFIG_VALUE_{n}"]
            for n in range(int(env["GIT_CONFIG_COUNT"]))}
    assert keys["credential.helper"] == ""  # every configured helper cleared
    helper = keys["credential.https://git.example.com:8443.helper"]
    assert "s3cret-token" not in helper
    assert env["GIT_TERMINAL_PROMPT"] == "0"
    assert "s3cret-token" not in " ".join(f"{k}={v}" for k, v in env.items()
                                           if k.startswith("GIT_"))
    # the helper, run as git runs it, answers `get` from the environment and nothing else
    snippet = helper.removeprefix("!")
    for action, expected in (("get", "username=bot\npassword=s3cret-token\n"),
                             ("store", ""), ("erase", "")):
        out = subprocess.run(["sh", "-c", f"{snippet} \"$@\"", snippet, action], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout == expected


def test_a_credential_with_a_line_break_is_refused(tmp_path: Path) -> None:
    remote = RemoteClone("https://h/r", tmp_path, token="abc\nprotocol=http")
    with pytest.raises(RemoteUnavailable, match="line break"):
        remote._environment(remote.credentials())
