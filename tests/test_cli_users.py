"""`fishim users add/list/remove`: accounts from the shop's terminal, passwords only ever hashed."""

import json
from pathlib import Path

from click.testing import CliRunner

from fishim.auth import verify_password
from fishim.cli import main
from fishim.store import Store


def run(db: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin, env={"FISHIM_DB": str(db)})
    return result.exit_code, result.stdout, result.stderr


def test_add_list_remove(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    assert run(db, "users", "add", "rider7", "--role", "rider", "--password-stdin", stdin="s3cret pass\n")[0] == 0
    assert run(db, "users", "add", "boss", "--role", "owner", "--password-stdin", stdin="another\n")[0] == 0

    code, out, _ = run(db, "users", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(u["name"], u["role"]) for u in listed] == [("boss", "owner"), ("rider7", "rider")]
    assert "s3cret" not in out and "argon2" not in out

    with Store(db, readonly=True) as store:
        user = store.get_user("rider7")
        assert user is not None and user.password_hash.startswith("$argon2id$")
        assert verify_password(user.password_hash, "s3cret pass")
        assert not verify_password(user.password_hash, "wrong")

    assert run(db, "users", "remove", "rider7")[0] == 0
    code, out, _ = run(db, "users", "list")
    assert code == 0 and "rider7" not in out and "boss" in out


def test_bad_requests_are_one_line_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    for args, stdin, expected in [
        (("users", "add", "bad name", "--role", "rider", "--password-stdin"), "pw\n", "bad user name"),
        (("users", "add", "rider8", "--role", "rider", "--password-stdin"), "\n", "empty password"),
        (("users", "remove", "nobody"), None, "no user 'nobody'"),
    ]:
        code, _, err = run(db, *args, stdin=stdin)
        assert code == 2, args
        assert err.startswith("fishim: ") and expected in err and err.count("\n") == 1
    code, _, err = run(db, "users", "add", "x", "--role", "emperor", "--password-stdin", stdin="pw\n")
    assert code == 2 and "emperor" in err  # click's own choice error names the bad value
